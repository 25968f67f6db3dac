"""References of distribution metrics: a statistics file (EDM's npz of mu/sigma, or ours) or a set of images.

Statistics files: EDM's format is an .npz with `mu` [2048] and `sigma` [2048, 2048] of Inception features. We write
the same two arrays (so EDM and other tools read our files), plus `<space>_mu`/`<space>_sigma` for other feature
spaces (clip, dinov2), optional `<space>_features` (kid, precision and recall need features, not statistics), and
`onestep_meta`, a JSON string recording the image size, count and the protocol of each space. A file without
`onestep_meta` is taken as EDM's (Inception features, EDM protocol, image size not recorded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, MissingFileError
from ..jsonio import to_json
from .base import FeatureExtractor, MetricError
from .distances import feature_stats, stats_sha256
from .weights import file_sha256

STATS_FORMAT = "onestep-reference-stats"
STATS_VERSION = 1


def _array_names(space: str) -> tuple[str, str, str]:
    """npz keys of a space's mean, covariance and features (Inception keeps EDM's bare mu/sigma)."""
    prefix = "" if space == "inception" else f"{space}_"
    return f"{prefix}mu", f"{prefix}sigma", f"{space}_features"


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    provenance: dict


@dataclass
class Reference:
    """What distribution metrics compare with; opened from --ref by `open_reference`."""

    path: Path
    kind: str  # "stats" or "images"
    resolution: tuple[int, int] | None  # (height, width); None when the file does not say.
    file_sha256: str | None = None
    meta: dict = field(default_factory=dict)
    images: object = None  # An ImageSource for kind "images".
    _cache: dict = field(default_factory=dict)

    def describe(self) -> dict:
        out = {"reference": str(self.path), "reference_kind": self.kind,
               "reference_image_size": f"{self.resolution[0]}x{self.resolution[1]}" if self.resolution else
               "not recorded in the file"}
        if self.file_sha256:
            out["reference_file_sha256"] = self.file_sha256
        if self.kind == "images":
            out["reference_num_images"] = self.images.num
        return out

    def check_resolution(self, resolution: tuple[int, int], what: str) -> None:
        if self.resolution is not None and tuple(self.resolution) != tuple(resolution):
            raise MetricError(
                f"The reference {self.path} was computed at {self.resolution[1]}x{self.resolution[0]} but {what} "
                f"is {resolution[1]}x{resolution[0]} (width x height); distances across resolutions are not "
                "comparable. Use reference statistics or images of the samples' resolution.")

    def stats(self, extractor: FeatureExtractor, extract_all, features_for: str | None = None) -> ReferenceStats:
        """Reference statistics in `extractor`'s space; `extract_all(source, extractor)` computes features of
        reference images (with the same extractor as the samples). `features_for` names a metric that needs the
        reference's features too (kid, precision, recall): an error if a statistics file lacks them."""
        if extractor.key not in self._cache:
            if self.kind == "images":
                features = extract_all(self.images, extractor)
                mu, sigma = feature_stats(features)
                prov = {**self.describe(), "reference_stats_sha256": stats_sha256(mu, sigma)}
                self._cache[extractor.key] = ReferenceStats(mu, sigma, features, prov)
            else:
                self._cache[extractor.key] = self._stats_from_file(extractor)
        result = self._cache[extractor.key]
        if features_for is not None and result.features is None:
            raise MetricError(f"Metric '{features_for}' needs the reference's features, not only its statistics "
                              f"(mu/sigma), and {self.path} holds none ('{_array_names(extractor.space)[2]}'). Pass "
                              "reference images as --ref, or write statistics with features: `onestep eval "
                              f"REFERENCE_IMAGES --metrics {features_for} --save-stats FILE`.")
        return result

    def _stats_from_file(self, extractor: FeatureExtractor) -> ReferenceStats:
        space = extractor.space
        mu_key, sigma_key, features_key = _array_names(space)
        with np.load(self.path, allow_pickle=False) as data:
            if mu_key not in data.files or sigma_key not in data.files:
                present = sorted({k[:-3] or "inception" for k in data.files if k.endswith("mu")})
                raise MetricError(f"Reference statistics {self.path} hold no '{space}' statistics ({mu_key}, "
                                  f"{sigma_key}); it has: {', '.join(present) or 'none'}. Make a file with them: "
                                  f"`onestep eval REFERENCE_IMAGES --metrics fd_{space} --save-stats FILE`.")
            mu, sigma = data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64)
            features = data[features_key] if features_key in data.files else None
        for name, array in ((mu_key, mu), (sigma_key, sigma), (features_key, features)):
            if array is not None and not np.isfinite(array).all():
                raise InputError(f"Reference statistics {self.path} hold NaN or inf in '{name}', so every distance "
                                 "to them would be NaN; make the file again from the reference images (`onestep eval "
                                 "REFERENCE_IMAGES --metrics fid --save-stats FILE`).")
        prov = {**self.describe(), "reference_stats_sha256": stats_sha256(mu, sigma)}
        recorded = self.meta.get("spaces", {}).get(space)
        if self.meta and recorded is None:
            raise MetricError(f"{self.path} has no record of how its '{space}' statistics were made.")
        if recorded is not None:
            ours = extractor.provenance.get("mode")
            theirs = recorded.get("mode")
            if _protocol_family(ours) != _protocol_family(theirs):
                raise MetricError(f"Reference {self.path} was made with FID mode '{theirs}' but this evaluation uses "
                                  f"'{ours}'; their preprocessing differs. Pass --fid-mode {theirs}, or make "
                                  f"reference statistics in mode '{ours}'.")
            prov["reference_protocol"] = recorded
        elif space == "inception":
            prov["reference_protocol"] = "not recorded (EDM-format file); assumed EDM's Inception protocol"
        return ReferenceStats(mu, sigma, features, prov)


def _protocol_family(mode: str | None) -> str | None:
    # legacy_tensorflow and edm feed the network the same TF1-resized images.
    return {"edm": "tf1", "legacy_tensorflow": "tf1"}.get(mode, mode)


def open_reference(path: str | Path) -> Reference:
    """A statistics .npz, an .npz of images, or a folder of images."""
    from ..sample_io import SAMPLES_NPZ, folder_source, npz_image_source

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"Reference {path} does not exist; pass reference statistics (.npz with mu and "
                               "sigma), a folder of images or an .npz of images.")
    if path.is_file() and path.suffix == ".npz":
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # numpy raises several types for corrupt files
            raise InputError(f"Reference {path} could not be read as an .npz file ({exc}).") from None
        with data:
            names = set(data.files)
            is_stats = any(n == "mu" or n.endswith("_mu") for n in names)
            meta = json.loads(str(data["onestep_meta"])) if "onestep_meta" in names else {}
        if is_stats:
            resolution = tuple(meta["resolution"]) if meta.get("resolution") else None
            return Reference(path, "stats", resolution, file_sha256(path), meta)
        images = npz_image_source(path)
        return Reference(path, "images", images.resolution, file_sha256(path), images=images)
    if path.is_dir():
        images = npz_image_source(path / SAMPLES_NPZ) if (path / SAMPLES_NPZ).is_file() else folder_source(path)
        return Reference(path, "images", images.resolution, images=images)
    raise InputError(f"Reference {path} is neither an .npz file nor a folder of images.")


def write_reference_stats(path: Path, features: dict[str, np.ndarray], extractors: dict[str, FeatureExtractor],
                          resolution: tuple[int, int], source_provenance: dict,
                          keep_features: set[str] = frozenset()) -> dict:
    """Save statistics of the given spaces (EDM-compatible mu/sigma for Inception); returns a description."""
    path = Path(path)
    arrays, spaces = {}, {}
    for space, feats in features.items():
        mu_key, sigma_key, features_key = _array_names(space)
        mu, sigma = feature_stats(feats)
        arrays[mu_key], arrays[sigma_key] = mu, sigma
        if space in keep_features:
            arrays[features_key] = feats.astype(np.float32)
        spaces[space] = {k: v for k, v in extractors[space].provenance.items() if k in ("mode", "features", "resize")}
        spaces[space]["weights_sha256"] = extractors[space].provenance.get("weights", {}).get("sha256")
        spaces[space]["stats_sha256"] = stats_sha256(mu, sigma)
    meta = {"format": STATS_FORMAT, "version": STATS_VERSION, "resolution": list(resolution),
            "num_images": int(next(iter(features.values())).shape[0]), "source": source_provenance,
            "spaces": spaces}
    arrays["onestep_meta"] = np.asarray(to_json(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return {"path": str(path), "sha256": file_sha256(path), "spaces": sorted(spaces),
            "features_kept": sorted(keep_features & set(spaces)), "num_images": meta["num_images"]}
