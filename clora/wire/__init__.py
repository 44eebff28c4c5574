"""Record types that cross a process boundary (Kafka messages, Redis records, webhook bodies) and
the Kafka helpers that carry them. The lowest layer: imports nothing of clora."""
