# Two commands: `make demo` and `make test`. Both create .venv if it is missing.
PY := .venv/bin/python
PIP := .venv/bin/pip

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and pinned: on a CPU machine this is the local CPU build; unpinned torch pulls CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

venv: .venv/.installed

demo: .venv/.installed
	.venv/bin/prep build --mix nemotron=0.5,ot3=0.5 --sample --out shards/ --overwrite
	.venv/bin/prep inspect shards/
	.venv/bin/prep verify shards/
	# a tiny random SmolLM3 on CPU needs short sequences to show a falling loss in about a minute
	.venv/bin/prep build --mix nemotron=0.5,ot3=0.5 --sample --seq-len 1024 --out runs/demo/shards-1k --overwrite
	.venv/bin/python -m train --shards runs/demo/shards-1k --model-config tiny --max-steps 30 --lr 3e-3 \
		--save-every 0 --output runs/demo/train --overwrite --report-to tensorboard
	# the run's curves from its metrics.jsonl (train_curves.png in the repo is this picture);
	# the same numbers in TensorBoard: .venv/bin/tensorboard --logdir runs/demo/train
	.venv/bin/python -m train.plot runs/demo/train -o runs/demo/train_curves.png

test: .venv/.installed
	$(PY) -m pytest -q

.PHONY: venv demo test
