# A virtual environment from requirements.txt, made on first use. It sees the system's packages,
# so a machine that already has torch installs nothing twice.
VENV ?= .venv
PYTHON = $(VENV)/bin/python
DEMO_LOGDIR = ./logs/demo

.PHONY: test test-gpu demo bench clean-demo

$(VENV)/.installed: requirements.txt
	python3 -m venv --system-site-packages $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q tests --ignore=tests/gpu

# The GPU suite (tests/gpu): fused kernels on CUDA and the scripts on a GPU; every test is
# skipped when torch.cuda.is_available() is False.
test-gpu: $(VENV)/.installed
	$(PYTHON) -m pytest -q tests/gpu

# The four stages on the embedded shapes dataset, offline, on a CPU.
demo: $(VENV)/.installed
	$(PYTHON) ANN_train.py --flagfile config/train_ANN/demo.txt
	$(PYTHON) SNN_conversion.py --flagfile config/SNN_convert/demo.txt
	$(PYTHON) SNN_ft.py --flagfile config/SNN_ft/demo.txt
	$(PYTHON) evaluate.py --flagfile config/SNN_evaluate/demo.txt
	@echo
	@echo "demo results under $(DEMO_LOGDIR):"
	@echo "  stage 1  ckpt.pt, sample/, tensorboard events     (tensorboard --logdir $(DEMO_LOGDIR))"
	@echo "  stage 2  converted_snn.pt, conversion.json, images/"
	@echo "  stage 3  SNN_2bit_ft/ (finetune.json, model_backpacks/, ft_blocks_samples/)"
	@echo "  stage 4  snn_eval.txt, images/"

bench: $(VENV)/.installed
	$(PYTHON) bench/run.py

clean-demo:
	rm -rf $(DEMO_LOGDIR)
