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


def test_flow_force_deploy_is_a_flag():
    """The README documents ``--force-deploy`` as a flag: it takes no value."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    flow = Path(__file__).resolve().parent.parent / "flows" / "bin_flow.py"
    done = subprocess.run([sys.executable, str(flow), "run", "--help"], capture_output=True, text=True,
                          env={**os.environ, "METAFLOW_USER": os.environ.get("METAFLOW_USER", "test")}, timeout=120)
    assert done.returncode == 0, done.stderr
    option = re.search(r"^\s*--force-deploy(.*)$", done.stdout, re.MULTILINE)
    assert option, done.stdout
    assert not option.group(1).lstrip().startswith(("BOOLEAN", "[")), option.group(0)


def test_a_pathspec_for_run_is_one_line_error(capsys, tmp_path):
    """``--run BinCountFlow/12`` (a pathspec, not an id) says what to give, without a traceback."""
    code = main(["evaluate", "--run", "BinCountFlow/12", "--source", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bincount: ") and err.count("\n") == 1, err
    assert "run id" in err
