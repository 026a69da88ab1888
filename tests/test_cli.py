"""The bincount command's own help: what a user reads first."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bincount
from bincount.cli import main

FLOW = Path(__file__).resolve().parent.parent / "flows" / "bin_flow.py"


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
    done = subprocess.run([sys.executable, str(FLOW), "run", "--help"], capture_output=True, text=True,
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


@pytest.mark.parametrize("name, config, message", [
    ("grid", {"points": [{"name": "a", "pretrained": "false"}]},
     "grid point 'a': pretrained = 'false': input should be a valid boolean"),
    ("grid", {"defaults": {"lr": 1e-3}, "points": [{"name": "a", "epochs": 1.5}]},
     "grid point 'a': epochs = 1.5: input should be a valid integer"),
    ("compute", {"compute": "batch", "gpu": -1}, "compute config: gpu = -1: input should be greater than or equal to 0"),
    ("deploy", {"role_arn": "arn:aws:iam::123456789012:role/r", "bucket": "b", "instance_count": "2"},
     "deploy config: instance_count = '2': input should be a valid integer"),
    ("deploy", {"bucket": "b"}, "--deploy-target sagemaker needs role_arn in the deploy config"),
])
def test_a_bad_config_stops_the_flow_before_any_task_in_one_line(tmp_path, name, config, message):
    """Configs are checked as Metaflow reads them (Config parser): the run fails before its start step,
    with one line naming the key, the value and what is allowed, and no traceback."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, str(FLOW), "--config", name, str(path), "run", "--source", "synthetic"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "METAFLOW_USER": os.environ.get("METAFLOW_USER", "test"),
                               "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path)})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert message in output and "Traceback" not in output, output
    assert not (tmp_path / ".metaflow" / "BinCountFlow").exists()  # no run was started


def test_an_unreachable_endpoint_is_a_one_line_error(capsys, tmp_path, synthetic_jpegs):
    from conftest import free_port

    image = tmp_path / "bin.jpg"
    image.write_bytes(synthetic_jpegs[1])
    code = main(["predict", "--endpoint", f"http://127.0.0.1:{free_port()}", str(image)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bincount: endpoint http://127.0.0.1:") and err.count("\n") == 1, err


def test_an_unexpected_error_is_one_line_unless_debugging(capsys, monkeypatch, tmp_path):
    """A bug (here a TypeError inside the audit) is one line that says it is internal and how to see
    the traceback; BINCOUNT_DEBUG=1 raises it instead."""
    import bincount.cli as cli

    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "_audit", broken)
    argv = ["audit", "--source", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "bincount: internal error: TypeError: unsupported operand (set BINCOUNT_DEBUG=1 for the traceback)\n"
    monkeypatch.setenv("BINCOUNT_DEBUG", "1")
    with pytest.raises(TypeError):
        main(argv)


@pytest.mark.parametrize("command", ["serve", "predict", "evaluate", "audit"])
def test_every_model_command_chooses_its_run_the_same_way(capsys, command):
    """--run, --champion, --branch and --production on each command that reads a run's model."""
    text = run_cli(capsys, command, "--help")
    for option in ("--run ID", "--champion TARGET", "--production", "--branch NAME"):
        assert option in text, (command, option)
    assert "user:<name>" in text  # the default scope is said


def test_run_and_champion_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["predict", "--run", "12", "--champion", "local", "x.jpg"])
    assert done.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--branch", "Not-Valid"], "bincount: --branch 'Not-Valid': The branch name must contain only lowercase"),
    (["--run", "12", "--production"], "bincount: --run names one run: give it without --champion, --branch or "
                                      "--production"),
])
def test_a_bad_run_choice_is_one_line(capsys, tmp_path, argv, message):
    code = main(["evaluate", "--source", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
