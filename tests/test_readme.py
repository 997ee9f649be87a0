"""The README is part of the code: the key table in the config reference matches the config, the tests the docs
name exist, and the README's main command does what it says."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayscale import config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_REFERENCE = ROOT / "docs" / "reference" / "config.md"  # the key table, between its markers
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def key_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, type_name, default, doc in config.describe():
        if "\n" in default:  # a block-style YAML list would break the table's row: write it inline
            default = yaml.safe_dump(yaml.safe_load(default), default_flow_style=True).strip()
        lines.append(f"| `{name}` | `{default}` | {doc} ({type_name}) |")
    return "\n".join(lines)


def test_readme_key_table_matches_the_config():
    text = CONFIG_REFERENCE.read_text()
    start, end = text.index("<!-- keys:start -->"), text.index("<!-- keys:end -->")
    assert text[start:end].split("\n", 1)[1].strip() == key_table(), (
        "the key table in docs/reference/config.md is stale: run `python tests/test_readme.py` to regenerate it")


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in README.read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


def test_tests_the_readme_names_exist():
    """Every `test_...` the README or a page of docs/ names is a test that exists."""
    import re

    named = {(doc.relative_to(ROOT).as_posix(), name) for doc in DOCS
             for name in re.findall(r"`(test_\w+)`", doc.read_text())}
    defined = set(re.findall(r"^def (test_\w+)", "".join(p.read_text() for p in ROOT.glob("tests/*.py")),
                             re.MULTILINE))
    missing = sorted((doc, name) for doc, name in named if name not in defined)
    assert {doc for doc, _ in named} >= {"README.md", "docs/guide/failures.md"} and not missing, missing


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
    # The README's transcript of this command, line by line ("..." for what varies; the run directory is the
    # reader's own): every line is one the run printed, so the front page cannot drift from the product.
    readme = (ROOT / "README.md").read_text()
    transcript = readme[readme.index("$ rayscale train\n"):].split("```")[0].splitlines()[1:]
    printed = (result.stdout + result.stderr).splitlines()
    assert len(transcript) > 10
    for line in transcript:
        if line.strip() == "..." or "/home/you/" in line:
            continue
        pattern = ".*".join(re.escape(part) for part in line.split("..."))
        assert any(re.search(pattern, out) for out in printed), f"README line not printed: {line!r}"


if __name__ == "__main__":  # regenerate the table in docs/reference/config.md in place
    text = CONFIG_REFERENCE.read_text()
    start, end = text.index("<!-- keys:start -->"), text.index("<!-- keys:end -->")
    CONFIG_REFERENCE.write_text(text[:start] + "<!-- keys:start -->\n" + key_table() + "\n" + text[end:])
