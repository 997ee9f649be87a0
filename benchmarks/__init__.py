"""Benchmarks (not timed tests): see benchmarks/README.md."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # git-ignored: figures are copied into the READMEs by hand


def output_dir_or_none(benchmark: str, path: Path) -> Path | None:
    """`--output-dir`, resolved, when it is new or empty; otherwise says so on stderr and gives None (exit 2)."""
    import sys

    path = path.resolve()
    if path.exists() and any(path.iterdir()):
        print(f"{benchmark}: --output-dir {path} is not empty; expected a new or empty directory", file=sys.stderr)
        return None
    return path
