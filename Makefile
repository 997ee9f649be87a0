# Every target sets itself up: a fresh machine needs only python3 (>= 3.10) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test train tune bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

train: setup
	$(VENV)/bin/rayscale train

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
