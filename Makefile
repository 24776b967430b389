# `make quickstart` and `make test` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/synthetic
OUT ?= output/quickstart

.PHONY: quickstart test doctor lint bench clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

# DeepSpeed (optional at run time, exercised by the tests) builds against the venv's torch.
$(BIN)/.installed-deepspeed: $(BIN)/.installed requirements-deepspeed.txt
	$(BIN)/pip install --no-build-isolation -r requirements-deepspeed.txt
	touch $@

$(DATA)/train.csv: $(BIN)/.installed
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

doctor: $(BIN)/.installed
	$(BIN)/python tools/doctor.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_pretrain_step.py

clean:
	rm -rf $(VENV) output
