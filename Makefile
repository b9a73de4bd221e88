# prospect-mailer: `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the test suite needs (installed with apt-get when running as root).
# chromium: the browser test of the unsubscribe page; swaks: the relay's end-to-end test.
DEBIAN_PACKAGES := chromium swaks

.PHONY: demo test lint typecheck pytest wheel-check sysdeps clean bench bench-full bench-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/prospect-mailer demo

sysdeps:
	@if [ -z "$(DEBIAN_PACKAGES)" ]; then \
	  echo "sysdeps: no Debian packages needed by this suite"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES); \
	else \
	  echo "sysdeps: NOT root, cannot install $(DEBIAN_PACKAGES); tests needing them will be skipped"; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy --strict prospect_mailer tests/type_usage.py

pytest: $(VENV)/.installed-test
	@source scripts/postgres-env.sh && $(BIN)/pytest $(PYTEST_ARGS)

# Test what users install: build the wheel, install it in a clean venv, check the templates and
# the console script are in it, and run the demo from the installed package.
wheel-check: $(VENV)/.installed-test
	@rm -rf build/wheel-check && mkdir -p build/wheel-check
	$(BIN)/python -m pip wheel --quiet --no-deps -w build/wheel-check .
	$(PYTHON) -m venv build/wheel-check/venv
	build/wheel-check/venv/bin/python -m pip install --quiet build/wheel-check/*.whl
	cd build/wheel-check && venv/bin/python -c "import prospect_mailer, pathlib; \
	  d = pathlib.Path(prospect_mailer.__file__).parent; \
	  assert (d / 'py.typed').exists(), 'py.typed missing'; \
	  t = sorted(p.name for p in (d / 'templates').glob('footer*')); \
	  assert len(t) >= 4, t; print('wheel ships templates:', t)"
	cd build/wheel-check && venv/bin/prospect-mailer demo --examples ../../examples --output demo >/dev/null \
	  && echo "wheel-check: installed console script ran the demo"

test: sysdeps lint typecheck pytest wheel-check

# Benchmarks side by side with their baselines (figures in bench/results/*.json). Needs
# Postfix's smtp-source/smtp-sink (installed as root; the daemon is never started). The first
# run builds a 10,000,000-entry suppression store under bench/.cache (about 5 minutes, once).
# `make bench` is the quick run (under 5 minutes on 2 cores; its dry run streams 500,000 CSV
# rows: memory is flat in the row count); `make bench-full` is the one the README's figures come
# from (more messages, relay worker processes, every MIME shape, the dry run over the 1,000,000
# rows of the memory target, audit appends onto a 2,000,000-record log (time-ordered ids against
# random ones), and the instruction counts under valgrind, about 5 minutes more).
bench: bench-tools
	$(BIN)/python -m bench.library --messages 1000 --sizes 2k,100k
	$(BIN)/python -m bench.relay --messages 500 --sizes 2k,100k,5m --workers 1 --writers process
	$(BIN)/python -m bench.suppression --entries 10000000 --batches 30 --singles 1000
	$(BIN)/python -m bench.audit --records 20000
	$(BIN)/python -m bench.mime --calls 500 --sizes 2k --kinds stdlib,bytes,full,relay
	$(BIN)/python -m bench.memory --prospects 500000 --sends 10000 --big-mb 20
	$(BIN)/python -m bench.summary

bench-full: bench-tools
	$(BIN)/python -m bench.library --messages 2000 --sizes 2k,100k
	$(BIN)/python -m bench.relay --messages 1000 --sizes 2k,100k,5m --workers 2
	$(BIN)/python -m bench.suppression --entries 10000000
	$(BIN)/python -m bench.audit --records 20000
	$(BIN)/python -m bench.audit_ids --prefill 2000000 --records 20000
	$(BIN)/python -m bench.mime
	$(BIN)/python -m bench.memory --prospects 1000000 --sends 20000 --big-mb 20
	$(BIN)/python -m bench.instructions --messages 400 --sizes 2k,100k
	$(BIN)/python -m bench.summary

bench-tools: $(VENV)/.installed-test
	@if [ "$$(id -u)" = 0 ] && ! command -v smtp-sink >/dev/null && [ ! -x /usr/sbin/smtp-sink ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix; fi
	@if [ "$$(id -u)" = 0 ] && ! command -v valgrind >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; fi

clean:
	rm -rf $(VENV) build dist demo-output .mypy_cache .ruff_cache .pytest_cache
