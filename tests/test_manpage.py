"""hupt(1): docs/hupt.1 is what hupt/manpage.py generates from the parser, and it renders.

Rendered with groff (every warning enabled: none may come) and with man -l
when they are installed; the rendered page (or, without them, the source)
names every command and every option.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hupt import manpage
from hupt.clispec import hupt_commands

PAGE = Path(__file__).resolve().parent.parent / "docs" / "hupt.1"


def test_the_checked_in_page_is_the_generated_one() -> None:
    assert PAGE.read_text() == manpage.render(), (
        "docs/hupt.1 is out of date: python3 -m hupt.manpage > docs/hupt.1")


def _every_name() -> list[str]:
    root = hupt_commands()
    names = [f"hupt {c.name}" for c in root.commands]
    names += [s for c in [root, *root.commands] for o in c.options for s in o.strings]
    names += ["EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"]
    return names


def test_groff_renders_it_without_a_warning() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_man_shows_every_command_and_option() -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    env = {**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat", "LANG": "C"}
    r = subprocess.run(["man", "-l", str(PAGE)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith("HUPT(1)")
    for name in _every_name():
        assert name in text, name
    assert "\\" not in text, "an escape left unrendered"


def test_the_source_has_every_command_and_option() -> None:
    source = PAGE.read_text()
    for name in _every_name():
        assert manpage.escape(name) in source, name
    assert not [line for line in source.splitlines() if line.startswith(".") and
                line.split()[0] not in (".\\\"", ".nr", ".ds", ".TH", ".ad", ".SH", ".SS",
                                        ".SY", ".YS", ".PP", ".TP", ".B", ".BR", ".RS",
                                        ".RE", ".nf", ".fi")]
