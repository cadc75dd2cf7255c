# One-line set-up: each target creates .venv and installs what it needs on first use.
# CPU machines get the local CPU wheel of torch; GPU users: make sweep TORCH=torch
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
SPACE  ?= thresholds.yaml
ARGS   ?=

.PHONY: setup sweep test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

sweep: setup  ## the main job: a Ray Tune + Optuna sweep, tracked in MLflow (phantom unless ARGS has --data-root)
	$(PY) orchestrator/sweep.py --space $(SPACE) $(ARGS)

test: setup   ## the whole test suite (real-data tests skip when ../shared/data is absent)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider $(ARGS)

bench: setup  ## fp32 vs bf16 step time, 2-D and 3-D, on this CPU -> bench/results/precision_*.json
	$(PY) bench/precision.py

clean:
	rm -rf $(VENV) ray_results mlflow.db mlflow.lock mlartifacts
