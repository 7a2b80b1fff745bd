# A virtual environment from requirements.txt, made on first use. It sees the system's packages,
# so a machine that already has torch installs nothing twice.
VENV ?= .venv
PYTHON = $(VENV)/bin/python
DEMO_LOGDIR = ./logs/demo

.PHONY: test test-gpu demo demo-energy bench clean-demo

$(VENV)/.installed: requirements.txt
	python3 -m venv --system-site-packages $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# Two workers (pytest-xdist), each taking whole test files: a file's fixtures are built once.
test: $(VENV)/.installed
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests --ignore=tests/gpu

# The GPU suite (tests/gpu): fused kernels on CUDA and the scripts on a GPU; every test is
# skipped when torch.cuda.is_available() is False.
test-gpu: $(VENV)/.installed
	$(PYTHON) -m pytest -q tests/gpu

# The four stages on the embedded shapes dataset, offline, on a CPU: the quantized ANN, its SNN in
# the default (exact) conversion mode and in the seed's mode, the seed's mode fine-tuned; each is
# evaluated, and the results table is printed and written to logs/demo/results.md.
DEMO_EVAL = $(PYTHON) evaluate.py --flagfile config/SNN_evaluate/demo.txt
SEED_MODE = --neuron=if --norm=step --tag=seed

demo: $(VENV)/.installed
	$(PYTHON) ANN_train.py --flagfile config/train_ANN/demo.txt
	$(PYTHON) SNN_conversion.py --flagfile config/SNN_convert/demo.txt
	$(PYTHON) SNN_conversion.py --flagfile config/SNN_convert/demo.txt $(SEED_MODE)
	$(PYTHON) SNN_ft.py --flagfile config/SNN_ft/demo.txt
	$(DEMO_EVAL) --eval_model_path=$(DEMO_LOGDIR)/ckpt.pt
	$(DEMO_EVAL) --eval_model_path=$(DEMO_LOGDIR)/converted_snn.pt
	$(DEMO_EVAL) --eval_model_path=$(DEMO_LOGDIR)/converted_snn_seed.pt
	$(DEMO_EVAL) --eval_model_path=$(DEMO_LOGDIR)/SNN_2bit_ft_seed/snn_ft.pt
	$(PYTHON) -m metrics.results --logdir=$(DEMO_LOGDIR)
	@echo
	@echo "demo results under $(DEMO_LOGDIR):"
	@echo "  stage 1  ckpt.pt, sample/, tensorboard events     (tensorboard --logdir $(DEMO_LOGDIR))"
	@echo "  stage 2  converted_snn.pt (exact mode), converted_snn_seed.pt (the seed's), conversion*.json, images/"
	@echo "  stage 3  SNN_2bit_ft_seed/ (finetune.json, model_backpacks/, ft_blocks_samples/)"
	@echo "  stage 4  snn_eval.txt, images/, results.md (the table above)"

# The energy demo: the spike-driven UNet (config/train_ANN/demo_spike_driven.txt, the demo's settings
# and budget) beside the seed's UNet of `make demo` (trained here too if it is not there yet, or
# resumed), both converted with two-phase neurons and compensated GroupNorm; each model is
# evaluated, the results table written to logs/demo_spike_driven/results.md, and bench/energy.py
# prints where the energy goes and draws it into logs/demo_spike_driven/energy.png.
SD_LOGDIR = ./logs/demo_spike_driven
TWO_PHASE = --neuron=two_phase --norm=compensated --tag=two_phase

demo-energy: $(VENV)/.installed
	$(PYTHON) ANN_train.py --flagfile config/train_ANN/demo.txt
	$(PYTHON) ANN_train.py --flagfile config/train_ANN/demo_spike_driven.txt
	$(PYTHON) SNN_conversion.py --flagfile config/SNN_convert/demo.txt $(TWO_PHASE)
	$(PYTHON) SNN_conversion.py --flagfile config/SNN_convert/demo_spike_driven.txt
	$(DEMO_EVAL) --logdir=$(SD_LOGDIR) --eval_model_path=$(DEMO_LOGDIR)/ckpt.pt
	$(DEMO_EVAL) --logdir=$(SD_LOGDIR) --eval_model_path=$(DEMO_LOGDIR)/converted_snn_two_phase.pt
	$(DEMO_EVAL) --logdir=$(SD_LOGDIR) --eval_model_path=$(SD_LOGDIR)/ckpt.pt
	$(PYTHON) evaluate.py --flagfile config/SNN_evaluate/demo_spike_driven.txt
	$(PYTHON) -m metrics.results --logdir=$(SD_LOGDIR)
	$(PYTHON) -m bench.energy $(DEMO_LOGDIR)/ckpt.pt $(SD_LOGDIR)/ckpt.pt --neuron=two_phase --norm=compensated \
		--labels "pytorch-ddpm UNet" "spike-driven UNet" --out $(SD_LOGDIR)/energy.png

bench: $(VENV)/.installed
	$(PYTHON) -m bench.run

clean-demo:
	rm -rf $(DEMO_LOGDIR) $(SD_LOGDIR)
