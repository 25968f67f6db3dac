"""A run directory that stays usable: a full disk, two runs on one --out, damaged or edited checkpoints, a failed
start, and Ctrl-C or a closed terminal.

Single-process runs of the gmm-sid preset with small MLPs: in process where a test injects a failure, through the
installed `onestep` script where the exit code, the signals and the process holding the lock are the promise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from onestep_cli import distill
from onestep_cli.config import resolve_config
from onestep_cli.engine import launch as launch_module
from onestep_cli.engine import loop
from onestep_cli.engine.signals import StopRequest
from onestep_cli.errors import DiskFullError
from onestep_cli.eval.base import MetricError
from onestep_cli.runs import checkpoint as checkpoint_module
from onestep_cli.runs import run_dir as run_dir_module
from onestep_cli.runs.checkpoint import (CheckpointError, find_latest_checkpoint, flatten_optimizer, list_checkpoints,
                                         load_optimizer_state, read_state, unflatten_optimizer, verify_checkpoint)
from onestep_cli.runs.lock import RunInUseError, RunLock, lock_held_for_me

SMALL = ["generator.mlp.hidden_dim=32", "fake.mlp.hidden_dim=32", "train.batch_size=64", "eval.metrics=[]",
         "train.tick_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
CLI_SMALL = ["distill", "--preset", "gmm-sid", *[arg for s in SMALL for arg in ("--set", s)]]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def config_for(*overrides: str):
    return resolve_config("gmm-sid", overrides=[*SMALL, *overrides])


def train(out: Path, *overrides: str, log=None):
    """An in-process run; returns its summary, the lines it logged kept in `log` if given."""
    return distill(config_for(*overrides), out, log=(log.append if log is not None else lambda message: None),
                   progress=False)


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def status_of(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def wait_for(condition, process, timeout=60.0):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) too early:\n{process.stderr.read()}")
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)


def stats_rows(run: Path) -> int:
    path = run / "stats.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


# -- 1. a full disk ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stats.jsonl", "metrics.jsonl"])
def test_a_cut_off_last_line_is_dropped_and_the_run_resumes(tmp_path, capsys, name):
    """A record cut off by a full disk (or a kill) is the file's last line, without its newline."""
    train(tmp_path, "train.max_steps=4", "eval.metrics=[swd]", "eval.every_steps=2", "eval.num_samples=100")
    cut_line = len((tmp_path / name).read_text().splitlines()) + 1
    with open(tmp_path / name, "a") as f:
        f.write('{"step": 5, "kimg": 0.3, "los')
    capsys.readouterr()
    summary = train(tmp_path, "train.max_steps=6", "eval.metrics=[swd]", "eval.every_steps=2", "eval.num_samples=100")
    assert f"Warning: dropping the cut-off last line {cut_line} of {tmp_path / name}" in capsys.readouterr().err
    assert summary.resumed_from == 4 and summary.step == 6
    assert steps_of(tmp_path / "stats.jsonl") == [1, 2, 3, 4, 5, 6]
    assert steps_of(tmp_path / "metrics.jsonl") == [2, 4, 6]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space_as_safetensors_says(*args, **kwargs):
    raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28) at path \"x\"")


@pytest.mark.parametrize("failure", [_no_space, _no_space_as_safetensors_says])
def test_a_checkpoint_on_a_full_disk_stops_with_a_sentence_and_the_previous_one_resumes(tmp_path, monkeypatch,
                                                                                        failure):
    real_save_file = checkpoint_module.save_file
    saves = []

    def save_file(tensors, path):
        saves.append(path)
        if "step-00000004" in path:
            failure()
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    with pytest.raises(DiskFullError) as raised:
        train(tmp_path, "train.max_steps=6")
    message = str(raised.value)
    assert f"The disk of {tmp_path / 'checkpoints'} is full" in message and "checkpoint step-00000004" in message
    assert "free space there, then run the same command again" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]  # The partial one removed.
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-00000002") is None
    assert status_of(tmp_path)["status"] == "failed" and "is full" in status_of(tmp_path)["error"]

    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)  # Space freed.
    summary = train(tmp_path, "train.max_steps=6")
    assert summary.resumed_from == 2 and summary.step == 6
    assert steps_of(tmp_path / "stats.jsonl") == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_through_the_cli_is_one_sentence_with_exit_code_1(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "save_file", _no_space)
    result = cli.invoke(*CLI_SMALL, "--set", "train.max_steps=2", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert f"Error: The disk of {tmp_path / 'run' / 'checkpoints'} is full" in message, message


def test_a_stats_row_on_a_full_disk_stops_with_a_sentence_and_leaves_the_file_whole(tmp_path, monkeypatch):
    real_open = open

    class HalfWritten:
        """A file on a disk that fills up halfway through the next line."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def seek(self, *args):
            return self.f.seek(*args)

        def truncate(self, size):
            return self.f.truncate(size)

        def write(self, data):
            if json.loads(bytes(data).decode())["step"] == 3:
                self.f.write(data[:10])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfWritten(f) if Path(path).name == "stats.jsonl" else f

    monkeypatch.setattr(run_dir_module, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(DiskFullError, match=rf"The disk of {tmp_path} is full .*writing stats.jsonl failed"):
        train(tmp_path, "train.max_steps=6")
    assert (tmp_path / "stats.jsonl").read_text().endswith("\n") and steps_of(tmp_path / "stats.jsonl") == [1, 2]
    monkeypatch.undo()
    assert train(tmp_path, "train.max_steps=6").resumed_from == 2


# -- 3. two runs on one --out --------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_second_run_on_the_same_out_is_refused_naming_the_first_and_takes_over_once_it_died(cli, tmp_path):
    run = tmp_path / "run"
    args = [*CLI_SMALL, "--set", "train.checkpoint_every=10", "--out", run]
    first = cli.start(*args, "--set", "train.max_steps=1000000")
    try:
        wait_for(lambda: (run / "checkpoints" / "step-00000010").is_dir(), first)
        second = cli.invoke(*args, "--set", "train.max_steps=1000000")  # In process: the first is the other one.
        assert first.poll() is None, "the second run stopped the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    message = " ".join(second.stderr.split())
    assert second.exit_code == 1 and "Traceback" not in second.output
    assert f"{run} is in use by another onestep run (PID {first.pid} on host {socket.gethostname()}" in message
    assert "pass another --out" in message

    # The first died holding the lock: the kernel released it, and the same command takes the run over.
    resumed = cli.invoke(*args, "--set", "train.max_steps=20")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming" in resumed.stderr and status_of(run)["status"] == "complete"


@pytest.mark.slow
@pytest.mark.e2e
def test_under_gpus_2_the_launcher_holds_the_lock_and_ctrl_c_checkpoints_every_rank(cli, tmp_path):
    run = tmp_path / "run"
    args = [*CLI_SMALL, "--set", "train.checkpoint_every=100000", "--set", "train.max_steps=1000000", "--out", run]
    with default_dispositions(signal.SIGINT, signal.SIGHUP):
        launcher = cli.start(*args, "--gpus", 2)
    try:
        wait_for(lambda: stats_rows(run) >= 5, launcher, timeout=120)
        second = cli.invoke(*args)  # In process: the launcher is the other one.
    finally:
        launcher.send_signal(signal.SIGINT)
    _, stderr = launcher.communicate(timeout=120)
    assert second.exit_code == 1
    assert f"is in use by another onestep run (PID {launcher.pid} on host" in " ".join(second.stderr.split())
    assert launcher.returncode == 0, stderr
    status = status_of(run)
    assert status["status"] == "stopped" and status["signal"] == "SIGINT" and status["processes"] == 2
    assert verify_checkpoint(run / "checkpoints" / f"step-{status['step']:08d}") is None


def test_a_held_lock_refuses_the_run_before_it_touches_the_folder(tmp_path):
    train(tmp_path, "train.max_steps=2")
    files = lambda: {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != ".lock"}
    before = files()
    with RunLock(tmp_path):
        with pytest.raises(RunInUseError, match=rf"\(PID {os.getpid()} on host {socket.gethostname()}, started "):
            train(tmp_path, "train.max_steps=4")
    assert files() == before
    assert train(tmp_path, "train.max_steps=4").resumed_from == 2  # Released.


def test_under_gpus_the_launcher_holds_the_lock_for_its_workers(tmp_path, monkeypatch):
    """The `--gpus` launcher holds the lock while its workers run; rank 0 does not take it again (here the worker
    runs in the launcher's process)."""
    config, out = config_for("train.max_steps=2"), tmp_path / "run"
    seen = {}

    def workers(plan, command, log):
        with pytest.raises(RunInUseError, match=f"PID {os.getpid()} "):
            RunLock(out).acquire()
        seen["held for the workers"] = lock_held_for_me(out)
        seen["worker step"] = distill(config, out, log=lambda message: None, progress=False).step
        return 0, None

    monkeypatch.setattr(launch_module, "run_torchrun", workers)
    assert launch_module.launch(config, out, launch_module.LaunchPlan(2), [], log=lambda message: None) == 0
    assert seen == {"held for the workers": True, "worker step": 2}
    assert not lock_held_for_me(out)
    with RunLock(out):  # Released when the workers are done.
        pass


def test_a_launch_that_fails_before_the_run_starts_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_module, "run_torchrun", lambda plan, command, log: (1, None))
    out = tmp_path / "run"
    assert launch_module.launch(config_for(), out, launch_module.LaunchPlan(2), [], log=lambda message: None) == 1
    assert not out.exists()


# -- 6. every checkpoint damaged -----------------------------------------------------------------------------------


def _truncate(folder: Path) -> None:
    path = folder / "fake.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_when_every_checkpoint_is_damaged_the_run_says_so_instead_of_starting_over(tmp_path):
    train(tmp_path, "train.max_steps=4")
    checkpoints = tmp_path / "checkpoints"
    for folder in list_checkpoints(checkpoints):
        _truncate(folder)
    log = []
    damaged = rf"No usable checkpoint in {checkpoints}: step-00000002, step-00000004 are all damaged"
    with pytest.raises(CheckpointError, match=damaged):
        train(tmp_path, "train.max_steps=6", log=log)
    assert "Falling back to the previous checkpoint" in log[0] and "No earlier checkpoint remains" in log[1]
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000002", "step-00000004"]
    assert steps_of(tmp_path / "stats.jsonl") == [1, 2, 3, 4]  # Nothing thrown away.

    shutil.move(checkpoints, tmp_path.parent / "damaged-checkpoints")  # What the message advises, to start over.
    summary = train(tmp_path, "train.max_steps=6")
    assert summary.resumed_from is None and steps_of(tmp_path / "stats.jsonl") == [1, 2, 3, 4, 5, 6]


def test_a_damaged_newer_checkpoint_is_set_aside_so_that_the_new_ones_are_kept(tmp_path):
    train(tmp_path, "train.max_steps=8", "train.keep_checkpoints=2")  # step-6, step-8
    checkpoints = tmp_path / "checkpoints"
    _truncate(checkpoints / "step-00000008")
    log = []
    # One checkpoint kept, one per step: the newest by name was the damaged step-8, which kept taking its place.
    summary = train(tmp_path, "train.max_steps=7", "train.keep_checkpoints=1", "train.checkpoint_every=1", log=log)
    assert summary.resumed_from == 6 and summary.step == 7
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000007"]
    assert find_latest_checkpoint(checkpoints, warn=pytest.fail)[1].name == "step-00000007"
    assert (checkpoints / "damaged-step-00000008" / "state.json").is_file()
    assert any(f"Note: moved the damaged step-00000008 aside to {checkpoints / 'damaged-step-00000008'}" in line
               for line in log)


# -- 7. state.json covered by the hashes ---------------------------------------------------------------------------


def _edit_state(folder: Path, edit) -> None:
    state = read_state(folder)
    edit(state)
    (folder / "state.json").write_text(json.dumps(state, indent=1))


@pytest.mark.parametrize("edit", [lambda state: state.update(step=5),
                                  lambda state: state["optimizers"]["generator"]["param_groups"][0].update(lr=1.0)],
                         ids=["step", "lr"])
def test_an_edited_state_json_is_refused_like_a_damaged_file(tmp_path, edit):
    train(tmp_path, "train.max_steps=4")
    newest = tmp_path / "checkpoints" / "step-00000004"
    _edit_state(newest, edit)
    assert "state.json was changed after it was written" in verify_checkpoint(newest)
    log = []
    assert train(tmp_path, "train.max_steps=6", log=log).resumed_from == 2
    assert "state.json was changed after it was written" in log[0]


def test_a_checkpoint_written_before_state_json_had_its_hash_stays_readable(tmp_path):
    train(tmp_path, "train.max_steps=4")
    newest = tmp_path / "checkpoints" / "step-00000004"
    _edit_state(newest, lambda state: state.pop("state_sha256"))
    assert verify_checkpoint(newest) is None
    assert train(tmp_path, "train.max_steps=6").resumed_from == 4


# -- 8. a failed start leaves nothing that refuses the corrected command ---------------------------------------


@pytest.mark.parametrize("setting, needle", [
    ("train.lr=1e300", "train.lr=1e+300 is beyond the largest float32"),
    ("eval.metrics=[fid]", "eval.metrics has fid, which need images, but this teacher's samples are points"),
])
def test_a_setting_that_cannot_train_is_refused_before_the_run_directory_exists(cli, tmp_path, setting, needle):
    result = cli.invoke(*CLI_SMALL, "--set", setting, "--out", tmp_path / "run")
    assert result.exit_code == 2 and needle in " ".join(result.stderr.split())
    assert not (tmp_path / "run").exists()


def test_a_run_that_failed_before_its_first_checkpoint_accepts_the_corrected_command(tmp_path, monkeypatch):
    def out_of_memory(self):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8000000000000 bytes.")

    monkeypatch.setattr(loop.Trainer, "step", out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        train(tmp_path, "train.max_steps=4", "train.batch_size=1000000000000")
    status = status_of(tmp_path)
    assert status["status"] == "failed" and "RuntimeError: DefaultCPUAllocator" in status["error"]
    monkeypatch.undo()
    log = []
    assert train(tmp_path, "train.max_steps=4", log=log).step == 4
    assert f"Note: {tmp_path} holds a run that wrote no checkpoint; it starts again with the new configuration " \
           "(train.batch_size: 1000000000000 -> 64)." in log


def test_a_metric_that_fails_at_the_end_keeps_the_last_checkpoint_and_the_corrected_eval_resumes(tmp_path,
                                                                                                monkeypatch):
    def failing(names, *args, **kwargs):
        raise MetricError(f"Metric '{names[0]}' needs weights that are not there.")

    monkeypatch.setattr(loop, "compute_metrics", failing)
    with pytest.raises(MetricError):
        train(tmp_path, "train.max_steps=4", "eval.metrics=[swd]")
    assert status_of(tmp_path)["status"] == "failed"
    assert find_latest_checkpoint(tmp_path / "checkpoints", warn=pytest.fail)[1].name == "step-00000004"
    monkeypatch.undo()
    # eval.*, keep_checkpoints, tick_every and checkpoint_every do not change training: a rerun may change them.
    summary = train(tmp_path, "train.max_steps=4", "eval.metrics=[mode_coverage]", "eval.num_samples=100",
                    "train.keep_checkpoints=1", "train.tick_every=2", "train.checkpoint_every=4")
    assert summary.resumed_from == 4 and set(summary.final_metrics) == {"mode_coverage"}
    assert steps_of(tmp_path / "metrics.jsonl") == [4] and status_of(tmp_path)["status"] == "complete"


def test_a_run_with_checkpoints_still_refuses_a_setting_that_changes_training(tmp_path):
    train(tmp_path, "train.max_steps=2")
    with pytest.raises(ValueError, match=r"different configuration \(train.lr: 0.001 -> 0.0001\)"):
        train(tmp_path, "train.max_steps=4", "train.lr=1e-4")


# -- 11. Ctrl-C and SIGHUP -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dispositions(*signals):
    """The child a test starts inherits ignored signals (a shell's background job ignores SIGINT): not here."""
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_and_sighup_finish_the_step_checkpoint_and_exit_zero(cli, tmp_path, sig):
    run = tmp_path / "run"
    with default_dispositions(signal.SIGINT, signal.SIGHUP):
        process = cli.start(*CLI_SMALL, "--set", "train.checkpoint_every=100000", "--set", "train.max_steps=1000000",
                            "--out", run)
    wait_for(lambda: stats_rows(run) >= 20, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    status = status_of(run)
    assert status["status"] == "stopped" and status["signal"] == sig.name
    step = status["step"]
    assert f"Received {sig.name}: stopping after the current step, with a checkpoint" in stderr
    assert f"stopped after step {step}" in stderr
    assert verify_checkpoint(run / "checkpoints" / f"step-{step:08d}") is None


def test_a_second_ctrl_c_stops_at_once_and_an_ignored_hangup_stays_ignored():
    # Python's own Ctrl-C handler, also where this test runs as a shell's background job (which ignores SIGINT).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    with default_dispositions(signal.SIGHUP), contextlib.ExitStack() as restore:
        restore.callback(signal.signal, signal.SIGINT, previous_int)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # As under nohup.
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal_name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # The handler runs here at the latest.
        with StopRequest(second_interrupt_aborts=False) as stop:  # A worker of a launch gets Ctrl-C twice.
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal_name == "SIGINT"



def test_a_run_copied_to_another_machine_resumes_bitwise_and_a_file_cut_short_in_transit_is_caught(tmp_path):
    reference = tmp_path / "reference"
    train(reference, "train.max_steps=8")
    first = tmp_path / "first"
    train(first, "train.max_steps=4")
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(first, moved, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(first)  # Nothing of the first machine's folder is left to lean on.
    train(moved, "train.max_steps=8")
    for name in ("generator", "fake", "ema"):
        ref = load_file(str(reference / "checkpoints" / "step-00000008" / f"{name}.safetensors"))
        got = load_file(str(moved / "checkpoints" / "step-00000008" / f"{name}.safetensors"))
        assert all(torch.equal(ref[key], got[key]) for key in ref), name

    short = tmp_path / "short"
    train(short, "train.max_steps=4")
    newest = short / "checkpoints" / "step-00000004" / "generator.safetensors"
    newest.write_bytes(newest.read_bytes()[:-1024])  # Copied in parts (split -b), and the last one never arrived.
    log = []
    train(short, "train.max_steps=6", log=log)
    assert any("step-00000004" in line for line in log), log  # Reported, and the step-2 checkpoint used instead.
    assert (short / "checkpoints" / "damaged-step-00000004").is_dir()


def test_resumed_adam_moments_take_the_channels_last_strides_of_their_parameters(tmp_path):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)  # As train.channels_last stores it on CUDA.
    running = torch.optim.Adam(conv.parameters(), lr=1e-2)
    for _ in range(2):
        conv.weight.grad, conv.bias.grad = torch.randn_like(conv.weight), torch.randn_like(conv.bias)
        running.step()
    tensors, meta = flatten_optimizer("generator", running.state_dict())
    save_file(tensors, str(tmp_path / "optimizers.safetensors"))  # Stored contiguous, as every checkpoint is.
    resumed = torch.optim.Adam(conv.parameters(), lr=1e-2)
    load_optimizer_state(resumed, unflatten_optimizer("generator", load_file(str(tmp_path / "optimizers.safetensors")),
                                                      json.loads(json.dumps(meta))))
    moment = resumed.state[conv.weight]["exp_avg"]
    assert moment.stride() == conv.weight.stride() != moment.contiguous().stride()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed.state[conv.weight][key], running.state[conv.weight][key])
