"""The README's `mupfast explain` block is what the command prints today, so the rules table it
shows cannot drift from the code; and the README stays a landing page whose links resolve."""

from __future__ import annotations

import re
import shlex

from mupfast.cli import main
from tests.helpers import ROOT

README = ROOT / "README.md"
EXPLAIN_BLOCK = re.compile(r"<!-- mupfast (explain [^>]*?) -->\n```text\n(.*?)```", re.S)


def test_the_readme_explain_block_is_the_commands_output(capsys, monkeypatch):
    blocks = EXPLAIN_BLOCK.findall(README.read_text())
    assert blocks, "README.md has no <!-- mupfast explain … --> block"
    monkeypatch.chdir(ROOT)  # the command names configs/… relative to the checkout
    for command, shown in blocks:
        assert main(shlex.split(command)) == 0
        printed = capsys.readouterr().out
        assert shown == printed, f"README block for `mupfast {command}` is stale; paste its output again"


def test_the_readme_is_a_landing_page_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    assert text.index("make demo") < text.index("make test") < 400  # the two commands come first
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: link to {target} is broken"
