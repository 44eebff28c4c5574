"""Benchmarks that ship with the package (`clora bench ...`): they start their own runtimes."""
