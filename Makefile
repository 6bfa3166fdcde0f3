# Every target creates or updates .venv itself: on a fresh machine `make train-stage1` and `make test`
# are the whole set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CORPUS := data/synth
ARGS ?=

.PHONY: install test train-stage1 train-stage2 train-curriculum eval data demo bench clean

install: $(STAMP)

# torch is pinned exactly in pyproject.toml, so pip takes the local CPU wheel here and the CUDA
# build of the same version on GPU nodes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data: $(CORPUS)/train.jsonl

$(CORPUS)/train.jsonl: | $(STAMP)
	$(BIN)/speechllm data synth --out $(CORPUS)

train-stage1: $(STAMP) $(CORPUS)/train.jsonl
	$(BIN)/speechllm train stages/stage1.yaml $(ARGS)

train-stage2: $(STAMP) $(CORPUS)/train.jsonl
	$(BIN)/speechllm train stages/stage2.yaml $(ARGS)

train-curriculum: $(STAMP) $(CORPUS)/train.jsonl
	$(BIN)/speechllm train stages/curriculum.yaml $(ARGS)

# Per-task metrics of the last stage's run (runs/stage2 if it has a checkpoint, else runs/stage1) on the
# offline test split: a table, and runs/<stage>/eval/test-seen/{report.json,report.md,predictions.jsonl,metrics.png};
# e.g. ARGS="--instructions both --max-examples 20".
EVAL_RUN = $(if $(wildcard runs/stage2/checkpoints/last.ckpt),runs/stage2,runs/stage1)
eval: $(STAMP) $(CORPUS)/train.jsonl
	$(BIN)/speechllm eval $(EVAL_RUN) --manifest $(CORPUS)/test.jsonl --split test $(ARGS)

# The whole recipe on the offline corpus, with self-pretrained stand-ins for the hub models: corpus,
# encoder (CTC) and LM pretraining, stage 1, stage 2, the no-stage-1 ablation, eval on the test split.
# Everything lands in runs/demo (results.md: the final table); rerunning skips the finished steps.
demo: $(STAMP)
	$(BIN)/python -m speechllm.demo --root runs/demo $(ARGS)

# Where a stage-1 training step's time goes, framework overhead, padding, the feature cache's speed-up, loader
# throughput, memory: bench/results.json, bench/results.md and a table (a few minutes on 2 CPU cores; not part
# of `make test`). On a GPU node: ARGS="--preset realistic" (WavLM-Base-size encoder + 0.5B LLM, bf16, MFU).
bench: $(STAMP) $(CORPUS)/train.jsonl
	$(BIN)/speechllm bench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q $(ARGS)

clean:
	rm -rf runs data bench .pytest_cache
