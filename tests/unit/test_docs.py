"""Docs that are generated from code stay in step with it."""

from pathlib import Path

from node import config

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    assert config.markdown_table() in readme, "regenerate the README table from node.config.markdown_table()"


def test_readme_starts_with_the_two_commands():
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    commands = [lines[i + 1] for i, line in enumerate(lines[:12]) if line.startswith("```sh")]
    assert commands[:2] == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[embedded]' && chatcluster up",
        "./scripts/test",
    ]
    assert (ROOT / ".ci/run").read_text().rstrip().endswith("exec ./scripts/test")
