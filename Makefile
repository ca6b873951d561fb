# Two commands: `make demo` and `make test`. Both create .venv if it is missing.
PY := .venv/bin/python
PIP := .venv/bin/pip

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and pinned: on a CPU machine this is the local CPU build; unpinned torch pulls CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

venv: .venv/.installed

demo: .venv/.installed
	.venv/bin/prep build --mix nemotron=0.5,ot3=0.5 --sample --out shards/ --overwrite
	.venv/bin/prep inspect shards/

test: .venv/.installed
	$(PY) -m pytest -q

.PHONY: venv demo test
