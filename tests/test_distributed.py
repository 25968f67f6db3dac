"""`onestep distill --gpus 2` on CPU: two gloo processes under torch.distributed.run, DDP and FSDP2.

Two processes with the global batch split between them must train the same networks as one process (up to float
rounding), resume on a different number of processes, stop cleanly on SIGTERM, and survive a SIGKILL mid-save.
Bitwise resumption after SIGKILL at random moments is tested in test_resilience.py (one process, faster).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onestep_cli.config import ConfigError, resolve_config
from onestep_cli.runs.checkpoint import PAUSE_ENV, read_sharded
from onestep_cli.runtime import distributed
from onestep_cli.runtime.distributed import _slurm_rendezvous, launcher_env
from onestep_cli.engine.launch import LaunchPlan
from onestep_cli.runs.networks import build_networks
from onestep_cli.engine.parallel import per_process_batch

SMALL = ["generator.mlp.hidden_dim=32", "fake.mlp.hidden_dim=32", "train.batch_size=64", "train.tick_every=5",
         "train.checkpoint_every=10", "train.keep_checkpoints=5", "eval.metrics=[swd]", "eval.num_samples=200"]
TOLERANCE = 1e-5  # Two processes sum the batch gradient in another order; 20 Adam steps keep it near 1e-7.


def args_for(*overrides: str) -> list[str]:
    return ["distill", "--preset", "gmm-sid", *[arg for s in (*SMALL, *overrides) for arg in ("--set", s)]]


def weights(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Generator, fake and EMA weights of a checkpoint of either format, as full tensors."""
    if not (checkpoint / ".metadata").is_file():
        return {name: load_file(str(checkpoint / f"{name}.safetensors")) for name in ("generator", "fake", "ema")}
    networks = build_networks(resolve_config("gmm-sid", overrides=SMALL))
    state = {name: {k: v.clone() for k, v in module.state_dict().items()}
             for name, module in (("generator", networks.generator), ("fake", networks.fake),
                                  ("ema", networks.generator))}
    read_sharded(checkpoint, state)
    return state


def assert_close(reference: Path, other: Path) -> None:
    ref, got = weights(reference), weights(other)
    for name in ref:
        for key in ref[name]:
            difference = (ref[name][key] - got[name][key]).abs()
            assert torch.all(difference <= TOLERANCE), f"{name}.{key} differs by {difference.max().item()}"


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torch.distributed.run starts each worker in its own session)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children + [grandchild for child in children for grandchild in descendants(child)]


def resume_in_process(cli, *args):
    """The one-process continuation of a two-process run, in this process (one thread, as each worker): what it
    reads from the run folder is checked, which a new interpreter would not change."""
    result = cli.invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory, one_thread_per_module) -> Path:
    """One process, 20 steps, checkpoints every 10: in this process, one thread as each worker."""
    run = tmp_path_factory.mktemp("one-process") / "run"
    result = cli.invoke(*args_for("train.max_steps=20"), "--out", run)
    assert result.exit_code == 0, result.output
    return run / "checkpoints"


@pytest.mark.slow
@pytest.mark.e2e
def test_two_processes_equal_one_process_and_resume_on_one(cli, tmp_path, reference):
    run = tmp_path / "two"
    result = cli.run(*args_for("train.max_steps=10"), "--gpus", 2, "--json", "--out", run)
    assert "starts 2 CPU processes communicating over gloo" in result.stderr  # No CUDA here: say so.
    assert result.stderr.count("Training on 2 processes (DDP, cpu)") == 1  # Only rank 0 prints...
    summary = json.loads(result.stdout)
    assert summary["processes"] == 2 and summary["step"] == 10 and "swd" in summary["metrics"]
    assert [json.loads(row)["step"] for row in (run / "stats.jsonl").read_text().splitlines()] == [5, 10]  # ...writes.
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    assert_close(reference / "step-00000010", run / "checkpoints" / "step-00000010")

    resumed = resume_in_process(cli, *args_for("train.max_steps=20"), "--out", run)
    assert "from step-00000010 (step 10, 0.6 kimg) on 1 process" in resumed.stderr
    assert_close(reference / "step-00000020", run / "checkpoints" / "step-00000020")


@pytest.mark.slow
@pytest.mark.e2e
def test_fsdp_sharded_save_survives_sigkill_mid_save_and_resumes_on_one_process(cli, tmp_path, reference):
    run = tmp_path / "fsdp"
    args = args_for("train.max_steps=20", "train.parallelism=fsdp")
    checkpoints = run / "checkpoints"
    process = cli.start(*args, "--gpus", 2, "--out", run, stdout=subprocess.DEVNULL, env={PAUSE_ENV: "0.5"})
    partial = checkpoints / ".partial-step-00000020"
    deadline = time.time() + 120
    # Both ranks have written their shards of step 20; rank 0 has not yet renamed the folder into place.
    while not ((checkpoints / "step-00000010").is_dir() and (partial / "__1_0.distcp").is_file()
               and (partial / "__0_0.distcp").is_file()):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "timed out waiting for the second save"
        time.sleep(0.01)
    for pid in [*descendants(process.pid), process.pid]:  # The whole machine dies: workers and launcher.
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert partial.is_dir() and not (checkpoints / "step-00000020").exists()
    assert (checkpoints / "step-00000010" / ".metadata").is_file()  # Sharded through torch.distributed.checkpoint.
    assert_close(reference / "step-00000010", checkpoints / "step-00000010")

    resumed = resume_in_process(cli, *args, "--out", run)  # Resharded from 2 processes onto 1.
    assert "from step-00000010 (step 10, 0.6 kimg) on 1 process" in resumed.stderr
    assert not partial.exists()
    assert_close(reference / "step-00000020", checkpoints / "step-00000020")


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_exits_zero(cli, tmp_path, one_thread):
    run = tmp_path / "run"
    args = args_for("train.checkpoint_every=100000", "eval.metrics=[]")
    process = cli.start(*args, "--set", "train.max_steps=1000000", "--gpus", 2, "--out", run, stdout=subprocess.DEVNULL)
    stats = run / "stats.jsonl"
    deadline = time.time() + 120
    while not (stats.is_file() and len(stats.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "timed out waiting for the first stats rows"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "stopped" and status["signal"] == "SIGTERM" and status["processes"] == 2
    step = status["step"]
    assert (run / "checkpoints" / f"step-{step:08d}").is_dir()
    assert f"Stopped by SIGTERM after step {step}, with a checkpoint" in stderr

    resumed = resume_in_process(cli, *args, "--set", f"train.max_steps={step + 5}", "--out", run)
    assert f"from step-{step:08d} (step {step}," in resumed.stderr
    assert json.loads((run / "run.json").read_text())["step"] == step + 5


def test_global_batch_must_split_evenly_over_processes_and_rounds(cli, tmp_path):
    # In process: the command must refuse before it starts any worker.
    result = cli.invoke(*args_for("train.max_steps=1"), "--gpus", "3", "--out", tmp_path / "run")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    message = " ".join(result.stderr.split())
    assert "train.batch_size 64 (the global batch) must be divisible by processes x train.grad_accumulation = " \
           "3 x 1 = 3; use 66 or 63" in message
    with pytest.raises(ConfigError, match="2 x 3 = 6"):
        per_process_batch(64, 2, 3)
    assert per_process_batch(64, 2, 4) == 8


@pytest.mark.e2e
def test_gradient_accumulation_and_checkpointing_match_the_plain_step(tmp_path, reference):
    from onestep_cli import distill

    torch.set_num_threads(1)
    config = resolve_config("gmm-sid", overrides=[*SMALL, "train.max_steps=10", "train.grad_accumulation=4",
                                                  "train.gradient_checkpointing=true", "eval.metrics=[]"])
    distill(config, tmp_path, log=lambda message: None, progress=False)
    assert_close(reference / "step-00000010", tmp_path / "checkpoints" / "step-00000010")


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),  # torchrun
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (5, 16, 1)),  # srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0"}, None),  # the batch script's own shell
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # srun with one task: relaunch
])
def test_launcher_detection(environ, expected):
    env = launcher_env(environ)
    assert (env and (env.rank, env.world_size, env.local_rank)) == expected


def test_srun_tasks_derive_the_rendezvous_from_slurm(monkeypatch):
    environ = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
               "SLURM_JOB_ID": "123456", "MASTER_ADDR": "node0"}
    _slurm_rendezvous(environ)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("5", "16", "1")
    assert environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    def no_scontrol(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(distributed.subprocess, "run", no_scontrol)
    missing = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[0-1]"}
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        _slurm_rendezvous(missing)


def test_launch_plan_arguments():
    assert "--standalone" in LaunchPlan(4).torchrun_args()
    multi = LaunchPlan(8, nnodes=2, node_rank=1, master_addr="node0", master_port=29600).torchrun_args()
    assert {"--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=node0",
            "--master-port=29600"} <= set(multi)
    assert any(arg.startswith("--signals-to-handle=") and "SIGUSR1" in arg for arg in multi)
    with pytest.raises(ConfigError, match="--master-addr"):
        LaunchPlan(8, nnodes=2).torchrun_args()
    with pytest.raises(ConfigError, match="--node-rank 2 must be below --nnodes 2"):
        LaunchPlan(8, nnodes=2, node_rank=2, master_addr="node0").torchrun_args()
