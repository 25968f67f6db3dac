"""Robustness of `--gpus N` launches and of the weight cache.

A killed launcher takes its workers with it; a killed worker stops the job with one clear error; the launcher checks
the teacher once before any rank starts; a hub teacher downloads into the Hugging Face cache like diffusers does; a
weight file changed in place (its mtime restored) is caught, because verifying re-reads its content.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_distributed import args_for, descendants


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its new parent to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def worker_rank(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(item.split(b"=", 1)[1]) for item in environ if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def training_workers(process: subprocess.Popen, run: Path, count: int = 2) -> dict[int, int]:
    """{rank: pid} of the workers of `process` once they train (stats.jsonl has a row)."""
    stats = run / "stats.jsonl"
    deadline = time.time() + 180
    while not (stats.is_file() and stats.read_text().strip()):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "timed out waiting for the first stats row"
        time.sleep(0.05)
    workers = {worker_rank(pid): pid for pid in descendants(process.pid)}
    workers.pop(None, None)
    assert len(workers) == count, workers
    return workers


def wait_until_dead(pids, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def kill_all(pids) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


LONG_RUN = ("train.checkpoint_every=100000", "eval.metrics=[]", "train.max_steps=1000000", "train.tick_every=1")


@pytest.mark.slow
@pytest.mark.e2e
def test_workers_die_with_a_sigkilled_launcher(cli, tmp_path):
    run = tmp_path / "run"
    process = cli.start(*args_for(*LONG_RUN), "--gpus", 2, "--out", run, stdout=subprocess.DEVNULL)
    workers = []
    try:
        workers = list(training_workers(process, run).values())
        process.kill()  # SIGKILL: the launcher can forward nothing.
        process.wait()
        survivors = wait_until_dead(workers, 10)
        assert not survivors, f"workers {survivors} kept running after their launcher was killed"
    finally:
        kill_all([*workers, *descendants(process.pid)])
        process.kill()
        process.communicate()


@pytest.mark.slow
@pytest.mark.e2e
def test_a_sigkilled_worker_stops_the_job_with_a_clear_error(cli, tmp_path):
    run = tmp_path / "run"
    process = cli.start(*args_for(*LONG_RUN), "--gpus", 2, "--out", run, stdout=subprocess.DEVNULL)
    workers = {}
    try:
        workers = training_workers(process, run)
        started = time.time()
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
        assert time.time() - started < 60, "the job went on long after a worker was killed"
        assert process.returncode == 1
        assert not wait_until_dead(workers.values(), 10)
        message = " ".join(stderr.split())
        assert "rank 1 was killed by SIGKILL" in message, stderr
        assert "run the same command again: it resumes" in message, stderr
    finally:
        kill_all([*workers.values(), *descendants(process.pid)])
        process.kill()
        process.communicate()
