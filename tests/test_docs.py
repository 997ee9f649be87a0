"""The docs cannot rot: every relative link reaches a file and, with an #anchor, a heading in it; the commands
the README's front page shows without a cluster are run here and answer what the page says."""

import re
from pathlib import Path

import pytest

from rayscale import cli, config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md", ROOT / "jobs" / "README.md",
        ROOT / "examples" / "README.md"]

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code: what a Markdown viewer turns into links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "``", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # https:, mailto: ... are not checked here


def test_the_docs_are_where_the_readme_says():
    assert all(doc.is_file() for doc in DOCS)
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    assert set(DOCS[1:-3]) <= linked, "a page of docs/ that the README does not link"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file_and_its_heading(doc):
    targets = links(doc)
    broken = []
    for target in targets:
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, broken


def test_the_link_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `title`: here\n\n```bash\n# not a heading\n```\n[ok](#a-title-here) [file](other.md) "
                    "[gone](#not-a-heading) [web](https://docs.ray.io) `[code](nowhere.md)`\n")
    assert anchors(page) == {"a-title-here"}
    assert links(page) == ["#a-title-here", "other.md", "#not-a-heading"]


def test_the_readme_names_every_command_the_cli_has():
    text = README.read_text()
    commands = cli.build_parser()._subparsers._group_actions[0].choices  # {name: parser}
    for name, parser in commands.items():
        if name == "config":
            for action in parser._subparsers._group_actions[0].choices:
                assert f"rayscale config {action}" in text, action
        else:
            assert f"rayscale {name} " in text, name


def test_config_keys_prints_every_key_as_the_readme_says(capsys):
    assert cli.main(["config", "keys"]) == 0
    keys = [name for name, *_ in config.describe()]
    first_words = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [word for word in first_words if word in set(keys)] == keys


def test_the_readmes_bad_input_example_is_what_the_cli_prints(capsys):
    """The front page's one example of bad input: the command after `$ ` and the line that follows it."""
    block = re.search(r"```\n\$ rayscale (config show [^\n]*)\n(rayscale: error: [^\n]*)\n```", README.read_text())
    assert block, "the README's bad-input example moved"
    command, expected = block.groups()
    assert cli.main(command.split()) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == expected + "\n"
