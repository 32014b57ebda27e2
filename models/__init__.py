"""Small example models for the README and the tests (random weights, CPU-fast)."""
