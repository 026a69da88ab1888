"""The bincount command's own help: what a user reads first."""

import re

import pytest

import bincount
from bincount.cli import main


def run_cli(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["predict", "--help"], ["evaluate", "--help"],
                                  ["audit", "--help"]])
def test_help_is_plain_text(capsys, argv):
    text = run_cli(capsys, *argv)
    assert "usage: bincount" in text
    # no reStructuredText leaking from docstrings: ``literals``, :roles:, |substitutions|
    assert not re.search(r"``|:(class|func|meth|mod):|\|\w+\|", text), text


def test_version(capsys):
    assert run_cli(capsys, "--version").strip() == f"bincount {bincount.__version__}"
