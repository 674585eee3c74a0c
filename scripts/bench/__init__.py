"""The modules of scripts/benchmark.py (docs/performance.md)."""
