"""``python -m fastcdml``: version, per-command help, help text as users read it, one install-hint form."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastcdml
from fastcdml.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as done:  # argparse's --help / --version / errors
        code = done.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


def test_version(capsys):
    code, out = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"fastcdml {fastcdml.__version__}"


def test_info_help_shows_help_and_does_not_run_info(capsys):
    code, out = _run(capsys, "info", "--help")
    assert code == 0 and "usage: fastcdml info" in out
    assert "ccl/cpu" not in out and "C++ extension" not in out


@pytest.mark.parametrize("tool, option", [("bench", "--quick"), ("demo", "--epochs")])
def test_tool_help_is_the_tools_own(capsys, tool, option):
    code, out = _run(capsys, tool, "--help")
    assert code == 0 and option in out and "usage:" in out


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["bench", "--help"], ["demo", "--help"]])
def test_help_text_has_no_markup(capsys, argv):
    _, out = _run(capsys, *argv)
    assert "``" not in out and ":func:" not in out and ":mod:" not in out
    assert not re.search(r"\bissues? \(?\d", out), "help text must not refer to the project's tracker"


def test_unknown_info_arguments_fail(capsys):
    code, out = _run(capsys, "info", "--frobnicate")
    assert code == 2 and "unrecognized arguments" in out


def test_console_entry_point_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "fastcdml", "--version"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT.parent)
    assert out.returncode == 0 and fastcdml.__version__ in out.stdout


def test_install_hints_use_one_form():
    """Every hint names the package, quoted: pip install 'fastcdml[extra]' (works in and outside a checkout)."""
    bad = []
    for path in [*ROOT.glob("fastcdml/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("examples/*.py"),
                 ROOT / "docs" / "install.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for hint in re.findall(r"pip install [^\s`)]*\[[^\]]*\][^\s`)\"]*", line):
                if not re.fullmatch(r"pip install 'fastcdml\[[a-z,]+\]'", hint):
                    bad.append(f"{path.relative_to(ROOT)}:{number}: {hint}")
    assert not bad, bad
