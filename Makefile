# Two commands do everything on a fresh machine:
#   make serve   set up .venv and start the runtime on embedded defaults
#   make test    set up .venv and run every test (CI runs exactly this)
.PHONY: setup serve test bench bench-gateway bench-feedback bench-trainer

setup:
	bash scripts/setup.sh

serve: setup
	.venv/bin/clora serve

test: setup
	.venv/bin/python -m pytest -ra

bench: bench-gateway bench-feedback bench-trainer

bench-gateway: setup
	.venv/bin/python benchmarks/gateway_overhead.py

bench-feedback: setup
	.venv/bin/python benchmarks/feedback_pipeline.py

bench-trainer: setup
	.venv/bin/python benchmarks/trainer_throughput.py
