# One entry point for everything: `make install`, `make test`, `make test-fast`, `make demo`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
REQS := requirements/torch.txt requirements/build.txt requirements/fairseq.txt requirements/runtime.txt requirements/hf.txt requirements/lightning.txt requirements/dev.txt
DEPS := $(VENV)/.deps-installed
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench clean

install: $(STAMP)

# The order matters: torch first (so nothing pulls another one), then the build tools fairseq's
# extensions compile against, then fairseq without its dependencies and without build isolation
# (isolation would download a fresh multi-GB torch to build against), then the pinned versions of
# everything else (requirements/runtime.txt: fairseq's real needs and the extras), the Hugging Face extra
# (requirements/hf.txt, constrained to the pinned torch), the Lightning extra (requirements/lightning.txt), then
# the test tools.
$(DEPS): $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/torch.txt
	$(PIP) install --quiet -r requirements/build.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -r requirements/fairseq.txt
	$(PIP) install --quiet -r requirements/runtime.txt -c requirements/torch.txt -c requirements/build.txt
	$(PIP) install --quiet -r requirements/hf.txt -c requirements/torch.txt -c requirements/build.txt -c requirements/runtime.txt
	$(PIP) install --quiet -r requirements/lightning.txt -c requirements/torch.txt -c requirements/build.txt -c requirements/runtime.txt -c requirements/hf.txt
	$(PIP) install --quiet -r requirements/dev.txt -c requirements/torch.txt
	@touch $(DEPS)

# The project itself, editable, without dependencies (they are all installed above, in the right order);
# then a check that the pins meet every range pyproject.toml declares (core and all extras) and that
# no torchaudio came in. Redone only when pyproject.toml or setup.py changes.
$(STAMP): $(DEPS) pyproject.toml setup.py
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PY) scripts/check_install.py
	@$(PY) -c "import torch, torchvision, fairseq, fairseq_asam; print('installed: torch', torch.__version__, '| torchvision', torchvision.__version__, '| fairseq', fairseq.__version__)"
	@touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

# Two tiers (tests/conftest.py): test-fast is the unit and equality tests, in-process, no test that
# starts a process or trains for more than about a second (those are marked slow); test is everything,
# on PYTEST_WORKERS xdist workers, one test file per worker at a time (--dist loadfile): a module's tests
# share its module-scoped runs. --no-loadscope-reorder: the workers take the files in collection order, the
# longest first (tests/conftest.py), not xdist's default order by number of tests, which leaves the
# modules with a few long end-to-end tests for last. (Not loadgroup: xdist 3.8's xdist_group does nothing under pytest 9.2,
# which no longer reads the item._nodeid it sets.)
PYTEST_WORKERS ?= 2

test-fast: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -ra -m "not slow" tests

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -ra --durations=25 -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

demo: install
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

bench: install
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) build *.egg-info
