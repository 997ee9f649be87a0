# Every target sets itself up: a fresh machine needs only python3 (>= 3.10) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup system-deps test train tune bench clean

setup: $(VENV)/.installed

# uv installs the pinned set in about half pip's time (its downloads run in parallel). It reads no pip config:
# pip's find-links (a local torch wheel) are handed on. It compiles no bytecode: the first process to import a
# module writes its .pyc, so only what runs is compiled (the tests import ~8,300 of the set's ~22,000 modules),
# and set-up took 23 s instead of 46 s on a fresh 2-core machine. That needs Python free to write it:
# where PYTHONDONTWRITEBYTECODE is set, every process of the tests would compile torch and Ray again (an import of
# both took 2x as long), so no target hands it on.
unexport PYTHONDONTWRITEBYTECODE

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9
	links="$$($(PY) -m pip config get global.find-links 2>/dev/null) $${PIP_FIND_LINKS:-}"; \
	$(VENV)/bin/uv pip install -q --python $(PY) \
	  $$(for link in $$links; do echo --find-links $$link; done) -r requirements.txt
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	touch $@

# tests/test_cluster.py runs `ray up` over its own sshd on 127.0.0.1 (sshd, rsync) and reads sockets with ss.
system-deps:
	@if ! { command -v sshd || test -x /usr/sbin/sshd; } >/dev/null || ! command -v rsync >/dev/null || ! command -v ss >/dev/null; then \
	  SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq --no-install-recommends openssh-server openssh-client rsync iproute2; \
	fi

test: setup system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

train: setup
	$(VENV)/bin/rayscale train

# Side-by-side benchmarks (not timed tests): writes benchmarks/results/*.json and summary.md.
bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
