# `make quickstart` and `make test` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/synthetic
OUT ?= output/quickstart
# LOCKED=1 installs the exact versions of requirements-lock.txt (the ones CI passed with) instead of the newest
# releases the requirement ranges admit; `make lock` rewrites it from this .venv.
LOCK := $(if $(LOCKED),-c requirements-lock.txt,)
STAMP := $(BIN)/.installed$(if $(LOCKED),-locked,)

.PHONY: quickstart test doctor lint bench lock clean

$(STAMP): requirements.txt requirements-dev.txt $(if $(LOCKED),requirements-lock.txt,)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements-dev.txt $(LOCK)
	rm -f $(BIN)/.installed $(BIN)/.installed-locked $(BIN)/.installed-deepspeed
	touch $@

# DeepSpeed (optional at run time, exercised by the tests) builds against the venv's torch.
$(BIN)/.installed-deepspeed: $(STAMP) requirements-deepspeed.txt
	$(BIN)/pip install --no-build-isolation -r requirements-deepspeed.txt $(LOCK)
	touch $@

$(DATA)/train.csv: $(STAMP)
	$(BIN)/python tools/make_synthetic_dataset.py --out $(DATA) --num_videos 240 --num_classes 4 --seed 0

# A small AdaMAE pre-trained on the synthetic set on CPU in a few minutes (see PRETRAIN.md, "Quickstart").
quickstart: $(DATA)/train.csv
	$(BIN)/python run_mae_pretraining.py --data_path $(DATA)/train.csv --output_dir $(OUT) \
	  --model pretrain_videomae_small_patch16_224 \
	  --model_kwargs '{"encoder_embed_dim": 192, "encoder_depth": 4, "encoder_num_heads": 3, "decoder_embed_dim": 96, "decoder_num_heads": 3}' \
	  --decoder_depth 2 --mask_type adaptive --mask_ratio 0.75 --no-normalize_target \
	  --num_frames 8 --sampling_rate 2 --input_size 96 --batch_size 16 --num_workers 2 \
	  --epochs 60 --warmup_epochs 3 --lr 3e-2 --min_lr 1e-3 --opt_betas 0.9 0.95 \
	  --save_ckpt_freq 20 --print_freq 20 --vis_freq 10 --device cpu

test: $(BIN)/.installed-deepspeed
	$(BIN)/python -m pytest -q

doctor: $(STAMP)
	$(BIN)/python tools/doctor.py

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pretrain_step.py

# Run after `make test` passed in this .venv: the lock then records versions the whole suite passed with.
lock: $(BIN)/.installed-deepspeed
	{ echo "# Exact versions the test suite passed with: Python $$($(BIN)/python -c 'import platform; print(platform.python_version())'), $$(uname -sm)."; \
	  echo "# Install with them: make test LOCKED=1 (or pip install -r requirements-dev.txt -c requirements-lock.txt)."; \
	  echo "# Regenerate after a passing make test: make lock."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -E '^(pip|setuptools|wheel)=='; } > requirements-lock.txt

clean:
	rm -rf $(VENV) output
