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


def scratch_or_none(benchmark: str, path: Path | None) -> Path | None:
    """Where a benchmark's runs go: `--output-dir` when it is new or empty (created), a new temporary directory
    when none was given, or None (exit 2) for a directory that already holds something, said on stderr: a run
    left there by an earlier invocation would be resumed (a finished one trains nothing), not measured."""
    import tempfile

    if path is None:
        return Path(tempfile.mkdtemp(prefix=f"rayscale-{benchmark}-"))
    path = output_dir_or_none(benchmark, path)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    return path
