"""Small shared helpers (timing, machine description) for benchmarks and the CLI."""
