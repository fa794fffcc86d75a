# kdbench: `make demo` runs the whole study on the tiny preset; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BROWSER_STAMP := $(VENV)/.browser-stamp
PRESET ?= tiny

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: install demo test ui clean

# Re-install when the project's dependencies change; torch is pinned in pyproject (CPU wheel).
$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/install.sh
	touch $@

install: $(STAMP)

# The UI test's browser: for the suite only, not the demo.
$(BROWSER_STAMP): scripts/install_browser.sh | $(STAMP)
	scripts/install_browser.sh
	touch $@

demo: $(STAMP)
	$(BIN)/kdbench demo --preset $(PRESET)

test: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest

ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/ui.sh

clean:
	rm -rf artifacts ray_results .dagster mlflow.db
	find mlruns -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
