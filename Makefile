# Two set-up commands for a fresh machine (see README):
#   make demo   install, then run a job end to end on the embedded farm
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
# CPU build of torch for development and CI; users on GPUs install torch their own way
# (the package itself asks only torch>=2.4). The pin must sit in the same pip command as
# the packages that depend on torch, or pip picks a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install browser demo up test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)" -e ".[workers,dev]"
	touch $@

install: $(VENV)/.installed

# the dashboard's tests drive a headless chromium: installed from the system's packages
# (Debian/Ubuntu: apt-get, as root or through sudo) when none is on PATH
browser:
	@[ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  command -v apt-get >/dev/null 2>&1 || { echo "install chromium for the dashboard tests" >&2; exit 1; }; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

demo: install
	$(VENV)/bin/farm demo

up: install
	$(VENV)/bin/farm up

test: install browser
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check farm workers scheduler storage tests bench

bench: install
	$(VENV)/bin/python bench/overhead.py

clean:
	rm -rf $(VENV) farm-data .pytest_cache
