"""The README is part of the code: its key table matches the config, its main command does what it says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayscale import config

README = Path(__file__).resolve().parents[1] / "README.md"


def key_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, type_name, default, doc in config.describe():
        lines.append(f"| `{name}` | `{default}` | {doc} ({type_name}) |")
    return "\n".join(lines)


def test_readme_key_table_matches_the_config():
    text = README.read_text()
    start, end = text.index("<!-- keys:start -->"), text.index("<!-- keys:end -->")
    assert text[start:end].split("\n", 1)[1].strip() == key_table(), (
        "README key table is stale: run `python tests/test_readme.py` to regenerate it")


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in README.read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


def test_tests_the_readme_names_exist():
    import re

    named = set(re.findall(r"`(test_\w+)`", README.read_text()))
    defined = set(re.findall(r"^def (test_\w+)", "".join(p.read_text() for p in README.parent.glob("tests/*.py")),
                             re.MULTILINE))
    assert named and not named - defined, named - defined


@pytest.mark.slow
def test_main_command_trains_the_embedded_default_to_95_percent(tmp_path):
    """`make train` is `.venv/bin/rayscale train` after set-up: run it as a user would, in a fresh directory."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([str(Path(sys.executable).parent / "rayscale"), "train"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "default" / "summary.json").read_text())
    assert summary["final"]["val_accuracy"] >= 0.95
    assert summary["world_size"] == 2 and summary["batch_plan"]["accumulation_steps"] > 1
    assert "val accuracy" in result.stdout


if __name__ == "__main__":  # regenerate the table in place
    text = README.read_text()
    start, end = text.index("<!-- keys:start -->"), text.index("<!-- keys:end -->")
    README.write_text(text[:start] + "<!-- keys:start -->\n" + key_table() + "\n" + text[end:])
