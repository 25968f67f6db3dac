"""Errors: one sentence for those the user can fix (OnestepError), a traceback and how to report it for anything else,
tracebacks always with --debug or ONESTEP_DEBUG=1; in a multi-process run rank 0 alone prints a fixable error."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import onestep_cli
from onestep_cli.cli import common
from onestep_cli.cli.app import app
from onestep_cli.errors import LaunchError, MissingFileError, OnestepError, UsageError

PACKAGE = Path(onestep_cli.__file__).parent
# Exceptions that never leave the package: control flow, caught where they are raised.
NOT_REPORTED = {"onestep_cli.report.grids.GridSkip": "why a source has no grid; a note in the report"}


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "ONESTEP_DEBUG": "", **(env or {})})


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_a_config_mistake_is_one_sentence_with_exit_code_2():
    result = invoke("distill", "--preset", "gmm-sim", "--set", "train.lr=abc", "--dry-run")
    assert result.exit_code == 2
    assert lines(result.output) == [lines(result.output)[0]] and result.output.startswith("Error: ")
    assert "train.lr" in result.output and "Traceback" not in result.output


def test_a_missing_source_is_one_sentence_with_exit_code_1(tmp_path):
    result = invoke("eval", tmp_path / "nowhere", "--metrics", "swd")
    assert result.exit_code == 1, result.output
    assert len(lines(result.output)) == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_a_command_line_mistake_is_a_usage_error(tmp_path):
    result = invoke("eval", tmp_path, "--metrics", "swd", "--precision", "bf8")
    assert result.exit_code == 2 and len(lines(result.output)) == 1 and "--precision 'bf8'" in result.output


def _broken_resolve_config(*args, **kwargs):
    raise RuntimeError("shape mismatch: [4, 3] vs [4, 2]")


def test_any_other_error_shows_its_traceback_and_how_to_report_it(monkeypatch):
    monkeypatch.setattr("onestep_cli.cli.distill.resolve_config", _broken_resolve_config)
    result = invoke("distill", "--preset", "gmm-sim", "--dry-run")
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output
    assert "RuntimeError: shape mismatch: [4, 3] vs [4, 2]" in result.output
    assert "_broken_resolve_config" in result.output  # The frame that raised it.
    assert lines(result.output)[-1] == common.REPORT_BUG and "onestep --version" in common.REPORT_BUG


def test_cuda_out_of_memory_says_so_after_its_traceback(monkeypatch):
    torch = pytest.importorskip("torch")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("onestep_cli.cli.distill.resolve_config", out_of_memory)
    result = invoke("distill", "--dry-run")
    assert result.exit_code == 1 and "Traceback" in result.output and "Tried to allocate" in result.output
    assert lines(result.output)[-1] == common.REPORT_OOM


def test_the_console_script_prints_the_traceback_and_exits_1(tmp_path):
    """The real entry point (no CliRunner): the traceback on stderr, the report line last, exit code 1."""
    code = ("import sys, onestep_cli.cli.distill as d\n"
            "def broken(*a, **k):\n    raise RuntimeError('shape mismatch')\n"
            "d.resolve_config = broken\n"
            "sys.argv = ['onestep', 'distill', '--dry-run']\n"
            "from onestep_cli.cli.app import main\nmain()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent, env={"PATH": "", "COLUMNS": "200", "PYTHONPATH": str(PACKAGE.parent)})
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" in result.stderr and "RuntimeError: shape mismatch" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == common.REPORT_BUG


@pytest.mark.parametrize("how", ["--debug", "ONESTEP_DEBUG=1"])
def test_debug_shows_the_traceback_of_a_fixable_error_too(how):
    args = ["distill", "--preset", "gmm-sim", "--set", "train.lr=abc", "--dry-run"]
    result = invoke("--debug", *args) if how == "--debug" else invoke(*args, env={"ONESTEP_DEBUG": "1"})
    assert result.exit_code == 2  # The same exit code as without it.
    assert "Traceback (most recent call last)" in result.output and "ConfigError" in result.output
    assert lines(result.output)[-1].startswith("Error: Invalid configuration")
    assert "Traceback" not in invoke(*args).output  # --debug lasts one invocation.


def test_debug_is_passed_on_to_the_workers_of_a_launch(monkeypatch):
    monkeypatch.setenv("ONESTEP_DEBUG", "")
    common.set_debug_option(True)
    try:
        assert common.worker_command(["distill", "--out", "x"]) == ["--debug", "distill", "--out", "x"]
    finally:
        common.set_debug_option(False)
    assert common.worker_command(["distill"]) == ["distill"]


def test_in_a_multi_process_run_rank_0_alone_prints_a_fixable_error():
    args = ["distill", "--preset", "gmm-sim", "--set", "train.lr=abc", "--dry-run"]
    rank0 = invoke(*args, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    rank1 = invoke(*args, env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert rank0.exit_code == 2 and "train.lr" in rank0.output
    # Rank 1 exits quietly with 0, so the launcher does not stop rank 0 before it has printed.
    assert rank1.exit_code == 0 and rank1.output == ""


def test_a_fixable_error_of_every_worker_is_printed_once(tmp_path):
    """`--gpus 2` with eval.ref missing: the launcher checks the config before any rank starts, so the sentence is
    printed once and no worker runs (the workers' own path is the test above)."""
    missing = tmp_path / "nowhere" / "ref.npz"
    result = subprocess.run([sys.executable, "-m", "onestep_cli", "distill", "--preset", "gmm-sim", "--gpus", "2",
                             "--set", f"eval.ref={missing}", "--set", "eval.metrics=[swd]", "--out", tmp_path / "run"],
                            capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent,
                            env={**os.environ, "COLUMNS": "1000", "PYTHONPATH": str(PACKAGE.parent),
                                 "ONESTEP_DEBUG": ""})
    assert result.returncode == 1
    assert result.stderr.count(f"Error: eval.ref {missing} does not exist") == 1, result.stderr
    assert "failed on rank" not in result.stderr and "Traceback" not in result.stderr


def test_an_error_of_one_rank_alone_is_printed_by_that_rank(monkeypatch):
    def no_gpu(*args, **kwargs):
        raise LaunchError("Local rank 1 has no GPU: only 1 are visible on this node.")

    monkeypatch.setattr("onestep_cli.cli.distill.resolve_config", no_gpu)
    result = invoke("distill", "--dry-run", env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert result.exit_code == 1 and "Local rank 1 has no GPU" in result.output


def test_errors_keep_the_builtin_bases_code_catches():
    assert issubclass(UsageError, ValueError) and UsageError.exit_code == 2
    assert issubclass(MissingFileError, FileNotFoundError) and MissingFileError.exit_code == 1
    assert str(MissingFileError("x does not exist")) == "x does not exist"


def _exception_classes() -> list[str]:
    """module.Class of every class in the package whose bases look like exceptions (read from the source, so that no
    module with optional dependencies has to be imported to find them)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                if any(b.endswith(("Error", "Exception", "Failure")) for b in bases):
                    found.append(f"{module}.{node.name}")
    return found


def test_every_error_class_of_the_package_is_an_onestep_error():
    names = _exception_classes()
    assert len(names) >= 12, names  # The walk finds the twelve classes the package had before OnestepError.
    offenders = []
    for name in names:
        module, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        if issubclass(cls, BaseException) and not issubclass(cls, OnestepError) and name not in NOT_REPORTED:
            offenders.append(name)
    assert offenders == [], f"derive these from onestep_cli.errors.OnestepError (or list them in NOT_REPORTED): " \
                            f"{offenders}"


def _raised(error: Exception) -> Exception:
    """`error` with the traceback of a raise, as gather_rows receives a failed shard's exception."""
    def extract_features():
        raise error
    try:
        extract_features()
    except Exception as caught:
        return caught


def test_a_bug_on_rank_1_prints_its_traceback_there_and_rank_1_exits_quietly(monkeypatch, capsys):
    import pickle

    from onestep_cli.runtime import distributed

    bug = _raised(RuntimeError("shape mismatch in rank 1's batch"))
    monkeypatch.setattr(distributed, "all_gather_object",
                        lambda obj, env: [(False, {}), (True, pickle.loads(pickle.dumps(obj[1])))])
    with pytest.raises(distributed.PeerFailure, match="Rank 1 failed: shape mismatch"):
        distributed.gather_rows(bug, distributed.DistEnv(1, 2, 1))
    printed = capsys.readouterr().err
    assert "Rank 1 failed with this error; rank 0 reports it" in printed and "extract_features" in printed
    assert issubclass(distributed.PeerFailure, OnestepError)  # Its rank exits quietly; rank 0 reports the cause.


def test_rank_0_raises_its_own_error_with_its_traceback_and_a_copy_of_another_ranks(monkeypatch, capsys):
    import pickle

    from onestep_cli.runtime import distributed

    own = _raised(RuntimeError("rank 0's bug"))
    monkeypatch.setattr(distributed, "all_gather_object",
                        lambda obj, env: [(True, pickle.loads(pickle.dumps(obj[1]))), (False, {})])
    with pytest.raises(RuntimeError) as raised:
        distributed.gather_rows(own, distributed.DistEnv(0, 2, 0))
    assert raised.value is own  # Not the pickled copy, which has lost the traceback.
    fixable = _raised(UsageError("image 30 is unreadable"))
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj, env: [(False, {}), (True, fixable)])
    with pytest.raises(UsageError, match="image 30"):
        distributed.gather_rows({}, distributed.DistEnv(0, 2, 0))
    assert capsys.readouterr().err == ""  # An OnestepError is printed once, by the CLI of rank 0.
