# The two set-up commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both install what they need: Debian packages (dcmtk, dicom3tools, plastimatch, orthanc, chromium,
# postgresql) when run as root and missing, and a virtual environment with torch 2.13.0 (CPU)
# installed before the package so pip never pulls CUDA wheels.

VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dcmtk dicom3tools plastimatch orthanc sqlite3 postgresql chromium
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages (install as root):$$missing; tests needing them are skipped"; fi; \
	fi

demo: setup system-deps
	$(VENV)/bin/airt demo

test: setup system-deps
	$(VENV)/bin/ruff check appliance core pipeline sequencing storage tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup system-deps
	$(PY) -m benchmarks.run_all
