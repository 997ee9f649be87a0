"""Benchmarks (not timed tests): see benchmarks/README.md."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # git-ignored: figures are copied into the READMEs by hand
