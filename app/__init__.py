"""The frontend: a Flask application factory, served by gunicorn as ``app:create_app()``."""

from __future__ import annotations

import logging
import time

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from config import Settings, load_settings
from tasks import redis_conn


def create_app(settings: Settings | None = None) -> Flask:
    from app import responses_api  # noqa: F401  registers /v1/responses on the blueprint
    from app.admission import Admission, AdmissionMiddleware
    from app.auth import APIKeys
    from app.errors import register_error_handlers
    from app.gateway import Gateway
    from app.processor import Processor
    from app.routes import bp
    from tasks.celery_app import make_celery

    settings = settings or load_settings()
    if not logging.getLogger().handlers:  # under gunicorn only its own loggers have handlers
        logging.basicConfig(level=settings.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__)
    app.config.update(
        LLMQ_SETTINGS=settings,
        LLMQ_STARTED=int(time.time()),
        MAX_CONTENT_LENGTH=settings.frontend.max_body_bytes,
        JSON_SORT_KEYS=False,
    )
    json_provider = DefaultJSONProvider(app)
    json_provider.ensure_ascii = False
    app.json = json_provider
    # Bounded: while Redis is down or hung, a request gets its 503 (app/errors.py) within
    # seconds. The stream reader's blocking XREAD (app/streams.py) waits 1 s, well within.
    client = redis_conn.client(settings, health_check_interval=30, socket_connect_timeout=2, socket_timeout=10)
    app.extensions["llmq.gateway"] = gateway = Gateway(settings, make_celery(settings), client)
    app.extensions["llmq.processor"] = processor = Processor(settings)
    app.extensions["llmq.api_keys"] = APIKeys(settings.frontend.named_api_keys)
    gateway.prepare()
    processor.prepare()
    app.register_blueprint(bp)
    register_error_handlers(app)
    # In front of Flask, so a refusal costs no request parsing (app/admission.py).
    admission = Admission(settings.frontend, client, lambda: gateway.live_roles().get("decode", 0))
    app.extensions["llmq.admission"] = admission
    app.wsgi_app = AdmissionMiddleware(app.wsgi_app, admission, settings.frontend)  # type: ignore[method-assign]
    logging.getLogger(__name__).info("frontend ready: model=%s redis=%s API keys: %s", settings.model.name,
                                     redis_conn.mask(settings.redis_url),
                                     ", ".join(settings.frontend.named_api_keys) or "none")
    return app
