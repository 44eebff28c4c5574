"""clora: online continual learning for LLM agents, one LoRA adapter per customer.

One import namespace. Layers, bottom to top (docs/design.md; tests/test_layers.py enforces them):
`clora.wire` (Kafka and Redis record types) and `clora.core` (settings, processes, embedded
services, customers, trace ids, HTTP helpers, the admin API client); the stages `clora.runtime`
(serving), `clora.feedback`, `clora.agents`, `clora.trainer`, `clora.evals`; and on top
`clora.stack` (the `clora serve` composition), `clora.demo` and `clora.cli`.
"""

__version__ = "0.1.0"
