"""`clora demo`: simulated customers and operator against a whole `clora serve` stack, and its report."""
