# Two commands do everything on a fresh machine:
#   make serve   set up .venv and start the runtime on embedded defaults
#   make test    set up .venv and run every test (CI runs exactly this)
.PHONY: setup serve test bench

setup:
	bash scripts/setup.sh

serve: setup
	.venv/bin/clora serve

test: setup
	.venv/bin/python -m pytest -ra

bench: setup
	.venv/bin/python benchmarks/gateway_overhead.py
