# The two commands a newcomer needs:  make serve   and   make test
CONFIG ?= configs/agg.yaml
PY := .venv/bin/python
# The tests' Redis (tests/conftest.py); started for the run, as `make serve` does, if none answers.
LLMQ_TEST_REDIS ?= redis://127.0.0.1:6379
WITH_TEST_REDIS := LLMQ_TEST_REDIS=$(LLMQ_TEST_REDIS) $(PY) -m launcher with-redis $(LLMQ_TEST_REDIS) --

.PHONY: setup serve test unit lint

setup:
	@bash scripts/setup.sh

serve: setup
	$(PY) -m launcher serve -f $(CONFIG)

test: setup
	$(WITH_TEST_REDIS) $(PY) -m pytest

unit: setup
	$(WITH_TEST_REDIS) $(PY) -m pytest -m "not integration"

# Ruff on the whole tree, mypy on the core packages (both configured in pyproject.toml).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
