# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 60
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_AUTH_MODE ?= disabled
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: install demo test test-fast bench experiments experiments-res experiments-real clean train-data

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/restore-video demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Training photographs (Debian wallpaper packages, apt as root) -> .cache/train-data; not needed by demo/test.
train-data: $(STAMP)
	$(BIN)/python -m storage.train_data $(if $(filter 0,$(shell id -u)),--install,)

bench: $(STAMP)
	$(BIN)/python -m bench.all

# The guidance sweep tunes on its clip, video-sr reports on other clips, shift-inpaint; 3 seeds; the tables are
# written into EXPERIMENTS.md. EXPERIMENT_SCALE is the scale the committed tables were made at (35 min on 2 shared
# CPU cores); `make experiments EXPERIMENT_SCALE=` runs the full grid (16-frame video-sr, λ x steps 25/50/100:
# many hours). EXPERIMENT_ARGS="--frames 4 --steps 2" for a smoke run.
EXPERIMENT_SCALE ?= --frames 8 --lambdas 0,0.5,1,2 --sweep-steps 25
experiments: $(STAMP)
	$(BIN)/restore-video experiment all --seeds 3 --update-doc EXPERIMENTS.md $(EXPERIMENT_SCALE) $(EXPERIMENT_ARGS)

# The same on the shipped models (sr8-res-gp, integral on sr8-res-white; MLflow experiments guidance-sweep-res and
# video-sr-res): the sweep tunes λ / steps / guidance space on the tuning clip with these models
# (work/experiments/tuning-res.json), video-sr reports on the report clips with that pick; same scale and seeds;
# written into EXPERIMENTS.md's own sections.
experiments-res: $(STAMP)
	$(BIN)/restore-video experiment guidance-sweep --family res --seeds 3 --update-doc EXPERIMENTS.md $(EXPERIMENT_SCALE) $(EXPERIMENT_ARGS)
	$(BIN)/restore-video experiment video-sr --family res --seeds 3 --update-doc EXPERIMENTS.md $(EXPERIMENT_SCALE) $(EXPERIMENT_ARGS)

# What a user gets on ordinary footage: the shipped defaults on wide 640x272 clips (sr8, sr4, old-film scratches and
# dust), next to the input; 3 seeds, 12 frames, 16 steps (flows.experiments.REAL_FRAMES / REAL_STEPS): ~20 min on 2
# cores from scratch.
experiments-real: $(STAMP)
	$(BIN)/restore-video experiment real-clips --seeds 3 --update-doc EXPERIMENTS.md $(EXPERIMENT_ARGS)

clean:
	rm -rf $(VENV) .prefect .cache work out
