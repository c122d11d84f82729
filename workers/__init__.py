"""Worker hosts: one vLLM engine per Celery worker process, and how it serves tasks."""
