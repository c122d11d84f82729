"""Celery entry point: ``celery -A tasks worker -Q decode`` and ``celery -A tasks flower``.

``tasks.app`` is built on first access (PEP 562), from ``LLMQ_CONFIG`` (default
configs/agg.yaml) plus the environment. That keeps ``tasks.messages`` and ``tasks.queues``
importable by the frontend and the launcher without loading a config as a side effect.
Nothing in tasks/ imports a role: the roles' lifecycle modules are the app's ``include``
(tasks/celery_app.py), and a worker loads vllm only when its role needs an engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

    # Declared for the type checker only: no binding exists until __getattr__ below makes one.
    app: Celery


def __getattr__(name: str):
    if name != "app":
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    global app
    from config import load_settings
    from tasks.celery_app import make_celery

    app = make_celery(load_settings())
    from tasks import generation  # noqa: F401  registers the tasks on `app`

    return app
