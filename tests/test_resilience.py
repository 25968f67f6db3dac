"""Runs that survive: SIGKILL at any moment (mid-save included), preemption signals, damaged checkpoints, NaN steps.

Single-process runs of the gmm-sid preset with small MLPs, through the installed `onestep` script where the exit
code and the messages are part of the promise, in process where a test needs to inject something.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onestep_cli import distill
from onestep_cli.config import resolve_config
from onestep_cli.runs.checkpoint import PAUSE_ENV, find_latest_checkpoint, list_checkpoints, verify_checkpoint
from onestep_cli.engine.trainer import NonFiniteError
from onestep_cli.runs.networks import build_networks
from poisoned_teacher import PoisonedTeacher

SMALL = ["generator.mlp.hidden_dim=32", "fake.mlp.hidden_dim=32", "train.batch_size=64", "eval.metrics=[]",
         "train.tick_every=10"]
CLI_SMALL = ["distill", "--preset", "gmm-sid", *[arg for s in SMALL for arg in ("--set", s)]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def wait_for(condition, timeout=60.0, process=None):
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before the awaited moment:\n"
                                 f"{process.stderr.read()}")
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.01)


def last_stats_step(run: Path, written_after: float = 0.0) -> int:
    """The step of the newest stats.jsonl row, if the file changed after `written_after` (a resumed run first drops
    the rows a killed run wrote past its checkpoint), else 0."""
    path = run / "stats.jsonl"
    if not path.is_file() or path.stat().st_mtime <= written_after:
        return 0
    rows = path.read_text().splitlines()
    return json.loads(rows[-1])["step"] if rows else 0


def assert_bitwise_equal(reference: Path, other: Path) -> None:
    for name in ("generator", "fake", "ema", "optimizers"):
        ref, got = load_file(str(reference / f"{name}.safetensors")), load_file(str(other / f"{name}.safetensors"))
        assert ref.keys() == got.keys()
        for key in ref:
            assert torch.equal(ref[key], got[key]), f"{name}.{key} differs from the uninterrupted run"


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_at_random_moments_and_mid_save_then_same_command_is_bitwise_uninterrupted(cli, tmp_path):
    """Also: the newest checkpoint left by the kills is then damaged, and the resume falls back past it."""
    args = [*CLI_SMALL, "--set", "train.max_steps=300", "--set", "train.checkpoint_every=25",
            "--set", "train.keep_checkpoints=3"]
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert cli.invoke(*args, "--out", reference).exit_code == 0  # In process, on one thread as the scripts below.
    checkpoints = run / "checkpoints"

    # Inside a checkpoint write: saves pause after each file, and the kill lands while a partial folder exists.
    process = cli.start(*args, "--out", run, env={PAUSE_ENV: "0.4"})
    wait_for(lambda: (checkpoints / "step-00000025").is_dir() and (checkpoints / ".partial-step-00000050").is_dir(),
             process=process)
    time.sleep(random.Random(0).uniform(0.0, 0.6))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (checkpoints / ".partial-step-00000050").is_dir(), "the kill did not land inside the save"
    assert not (checkpoints / "step-00000050").exists()

    # At random moments of training: wait until the resumed run has made progress, then kill after a random delay.
    rng = random.Random(1)
    for _ in range(2):
        resumed_at = max((int(p.name.split("-")[1]) for p in list_checkpoints(checkpoints)), default=0)
        started = time.time()
        process = cli.start(*args, "--out", run)
        wait_for(lambda: last_stats_step(run, written_after=started) > resumed_at, process=process)
        time.sleep(rng.uniform(0.0, 0.15))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (run / "export").exists(), "the run finished before it could be killed"

    # And the newest checkpoint the kills left is damaged: reported, and the one before it is used. When it is the
    # only one the run refuses to start over silently (test_run_robustness.py), and does once it is moved away.
    complete = list_checkpoints(checkpoints)
    _damage(complete[-1], "truncated")
    if len(complete) == 1:
        refused = cli.run(*args, "--out", run, check=False)
        assert refused.returncode == 1 and "No usable checkpoint" in refused.stderr
        shutil.move(complete[-1], tmp_path / complete[-1].name)
    resumed = cli.run(*args, "--out", run)
    message = " ".join((refused.stderr if len(complete) == 1 else resumed.stderr).split())
    assert f"{complete[-1].name}: file fake.safetensors is missing or does not match its recorded hash" in message
    if len(complete) > 1:
        assert "Falling back to the previous checkpoint" in message
        assert f"Resuming {run} from {complete[-2].name}" in message
    assert not any(p.name.startswith(".partial-") for p in checkpoints.iterdir())
    assert_bitwise_equal(reference / "checkpoints" / "step-00000300", checkpoints / "step-00000300")
    steps = [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # No duplicated or stale rows from the killed runs.


@pytest.mark.e2e
def test_sigusr1_finishes_the_step_checkpoints_and_exits_zero(cli, tmp_path):
    run = tmp_path / "run"
    args = [*CLI_SMALL, "--set", "train.checkpoint_every=100000", "--out", run]
    process = cli.start(*args, "--set", "train.max_steps=1000000")
    wait_for(lambda: last_stats_step(run) >= 20, process=process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "stopped" and status["signal"] == "SIGUSR1"
    step = status["step"]
    assert f"stopped after step {step}" in stderr and "Run the same command again" in stderr
    assert verify_checkpoint(run / "checkpoints" / f"step-{step:08d}") is None
    # The next start continuing from it is checked after SIGTERM in test_distributed.py.


def _damage(folder: Path, how: str) -> None:
    if how == "truncated":
        path = folder / "fake.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "corrupted":
        path = folder / "optimizers.safetensors"
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "state_json":
        (folder / "state.json").write_text('{"step": 4')
    elif how == "shard":
        path = folder / "__0_0.distcp"
        path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("how, parallelism", [("truncated", "ddp"), ("corrupted", "ddp"), ("state_json", "ddp"),
                                              ("shard", "fsdp")])
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, how, parallelism):
    config = resolve_config("gmm-sid", overrides=[*SMALL, "train.max_steps=6", "train.checkpoint_every=2",
                                                  "train.keep_checkpoints=5", f"train.parallelism={parallelism}"])
    distill(config, tmp_path, log=lambda message: None, progress=False)
    newest = tmp_path / "checkpoints" / "step-00000006"
    _damage(newest, how)
    warnings = []
    state, folder = find_latest_checkpoint(tmp_path / "checkpoints", warn=warnings.append)
    assert folder.name == "step-00000004" and state["step"] == 4
    assert len(warnings) == 1 and str(newest) in warnings[0] and "Falling back" in warnings[0]


def _poisoned_run(tmp_path, poisoned, *overrides):
    config = resolve_config("gmm-sid", overrides=[*SMALL, "train.tick_every=1", *overrides])
    base = build_networks(config).teacher
    networks = build_networks(config, teacher=PoisonedTeacher(base, poisoned).requires_grad_(False).eval())
    return config, networks


def test_injected_nan_steps_are_skipped_and_counted(tmp_path):
    config, networks = _poisoned_run(tmp_path, lambda call: call in (4, 5), "train.max_steps=8",
                                     "train.checkpoint_every=1", "train.keep_checkpoints=10")
    summary = distill(config, tmp_path, log=lambda message: None, progress=False, networks=networks)
    assert summary.step == 8
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [row["nonfinite_total"] for row in stats] == [0, 0, 0, 1, 2, 2, 2, 2]
    checkpoint = lambda step, name: load_file(str(tmp_path / "checkpoints" / f"step-{step:08d}" /
                                                  f"{name}.safetensors"))
    for key, value in checkpoint(3, "generator").items():  # Steps 4 and 5 left the generator untouched...
        assert torch.equal(value, checkpoint(5, "generator")[key])
    assert any(not torch.equal(v, checkpoint(6, "generator")[k]) for k, v in checkpoint(5, "generator").items())
    assert any(not torch.equal(v, checkpoint(5, "fake")[k]) for k, v in checkpoint(3, "fake").items())  # ...not fake.
    for value in checkpoint(8, "generator").values():
        assert torch.isfinite(value).all()


def test_persistent_nan_stops_with_the_promised_error_and_the_last_checkpoint_intact(tmp_path):
    config, networks = _poisoned_run(tmp_path, lambda call: call >= 5, "train.max_steps=50",
                                     "train.checkpoint_every=2", "train.max_consecutive_nonfinite=3")
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps had NaN/inf .* \(steps 5-7, .*last checkpoint is "
                                             r"intact"):
        distill(config, tmp_path, log=lambda message: None, progress=False, networks=networks)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"
    state, folder = find_latest_checkpoint(tmp_path / "checkpoints", warn=pytest.fail)
    assert folder.name == "step-00000006"  # Written during the NaN run: it holds the step-4 generator, intact.
    for value in load_file(str(folder / "generator.safetensors")).values():
        assert torch.isfinite(value).all()


@pytest.mark.e2e
def test_persistent_nan_through_the_cli_exits_nonzero(cli, tmp_path):
    # A learning rate of 1e38 overflows the weights on the first update: every later step is NaN.
    result = cli.invoke(*CLI_SMALL, "--set", "train.lr=1e38", "--set", "train.max_consecutive_nonfinite=3",
                        "--set", "train.max_steps=50", "--set", "train.checkpoint_every=1", "--out", tmp_path / "run")
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert "Error: 3 consecutive steps had NaN/inf losses or gradients" in message and "Lower train.lr" in message
    assert find_latest_checkpoint(tmp_path / "run" / "checkpoints", warn=pytest.fail) is not None


def test_fp16_scale_search_overflows_are_counted_but_do_not_stop_the_run():
    from onestep_cli.engine.trainer import Trainer

    config = resolve_config("gmm-sid", overrides=[*SMALL, "train.max_consecutive_nonfinite=2"])
    trainer = Trainer(config, build_networks(config), torch.device("cpu"), "fp32")
    # A GradScaler that starts far too high overflows for several steps while it halves its scale, as fp16 does.
    trainer.scaler_generator = torch.amp.GradScaler("cpu", init_scale=2.0**126)
    trainer.scaler_fake = torch.amp.GradScaler("cpu", init_scale=2.0**126)
    for _ in range(8):
        trainer.step()
    assert trainer.nonfinite_total > config.train.max_consecutive_nonfinite and trainer.consecutive_nonfinite == 0
    assert all(torch.isfinite(p).all() for p in trainer.generator.parameters())
