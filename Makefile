# Two commands do everything on a fresh machine:
#   make demo    set up .venv and run `clora demo` on embedded defaults (the main job)
#   make test    set up .venv and run every test (CI runs exactly this)
# `make serve` sets up and starts the runtime alone.
.PHONY: setup demo serve test unit docs bench bench-gateway bench-feedback bench-trainer

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/clora demo

serve: setup
	.venv/bin/clora serve

test: setup  # two workers: the in-process stack's tests on one, the runtimes of their own beside (tests/conftest.py)
	.venv/bin/python -m pytest -ra -n 2 --dist loadgroup

docs: setup  # docs/configuration.md's tables from Settings (tests/test_settings.py keeps them equal)
	.venv/bin/python -m clora.core.config_docs docs/configuration.md

unit: setup  # the logic tests alone: no vLLM, broker or Redis, no child process (tests/conftest.py)
	.venv/bin/python -m pytest -ra -m "not integration"

bench: bench-gateway bench-feedback bench-trainer

bench-gateway: setup
	.venv/bin/python benchmarks/gateway_overhead.py

bench-feedback: setup
	.venv/bin/python benchmarks/feedback_pipeline.py

bench-trainer: setup
	.venv/bin/python benchmarks/trainer_throughput.py
