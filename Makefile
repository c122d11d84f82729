# The two commands a newcomer needs:  make serve   and   make test
CONFIG ?= configs/agg.yaml
PY := .venv/bin/python

.PHONY: setup serve test unit lint-compose

setup:
	@bash scripts/setup.sh

serve: setup
	$(PY) -m launcher serve -f $(CONFIG)

test: setup
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest -m "not integration"
