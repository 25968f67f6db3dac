"""The Inception input made where the network runs: uint8 images go to the metric device and are converted and resized
there (TF1 bilinear, modes `edm` and `legacy_tensorflow`), and generated images are quantised on their device. Both
must give what the host path gave: bit for bit on the CPU, within 1e-6 of the 0..255 range on CUDA (another matrix
library), never in TF32 or autocast whatever the process set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onestep_cli.eval import MetricContext
from onestep_cli.eval.inception import INCEPTION_SIZE, InceptionFeatures, clean_resize, inception_input
from onestep_cli.sample_io import as_uint8_nhwc, to_uint8_images
from onestep_cli.sampling import generator_source

TF1_MODES = ("edm", "legacy_tensorflow")
SIZES = (8, 32, 64)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
CUDA_ATOL = 1e-6 * 255  # One part in a million of the pixel range; TF32 would be off by ~0.1.


def host_inception_input(images: np.ndarray) -> torch.Tensor:
    """The TF1 preprocessing as it ran on the host before it moved to the device (frozen copy)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[2:] == (INCEPTION_SIZE, INCEPTION_SIZE):
        return x.contiguous()

    def matrix(n_in: int, n_out: int) -> torch.Tensor:
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        low = src.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        frac = src - low
        out = torch.zeros(n_out, n_in, dtype=torch.float64)
        out[torch.arange(n_out), low] += 1 - frac
        out[torch.arange(n_out), high] += frac
        return out.to(torch.float32)

    return matrix(x.shape[2], INCEPTION_SIZE) @ x @ matrix(x.shape[3], INCEPTION_SIZE).T


def random_uint8(size: int, num: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + size).integers(0, 256, (num, size, size, 3), dtype=np.uint8)


def assert_same_input(made: torch.Tensor, expected: torch.Tensor, device: str):
    assert made.device.type == device and made.dtype == torch.float32
    assert made.shape == expected.shape == (expected.shape[0], 3, INCEPTION_SIZE, INCEPTION_SIZE)
    if device == "cpu":
        assert torch.equal(made, expected), f"differs by up to {(made - expected).abs().max().item()}"
    else:
        torch.testing.assert_close(made.cpu(), expected, rtol=0, atol=CUDA_ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", TF1_MODES)
@pytest.mark.parametrize("size", SIZES)
def test_device_preprocessing_equals_the_host_one(size, mode, device):
    images = random_uint8(size)
    assert_same_input(inception_input(images, mode, device), host_inception_input(images), device)


def test_the_frozen_host_path_tells_the_resize_apart():
    """The comparison can fail: PyTorch's own bilinear resize (half-pixel centres) is a different 299x299 tensor."""
    images = random_uint8(32)
    other = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(),
                                            size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear")
    assert not torch.equal(inception_input(images, "edm"), other)
    assert (host_inception_input(images) - other).abs().max() > 1


@pytest.mark.parametrize("device", DEVICES)
def test_caller_autocast_and_tf32_do_not_reach_the_resize(device):
    images = random_uint8(32)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # As the engine's --tf32 leaves the process.
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            made = inception_input(images, "edm", device)
        assert torch.backends.cuda.matmul.allow_tf32, "the caller's TF32 setting was not restored"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert_same_input(made, host_inception_input(images), device)


def test_299_pixel_images_are_only_converted():
    images = random_uint8(INCEPTION_SIZE, num=1)
    made = inception_input(images, "legacy_tensorflow")
    assert made.is_contiguous() and torch.equal(made, torch.from_numpy(images).permute(0, 3, 1, 2).float())


def test_clean_mode_keeps_clean_fids_host_resizer():
    images = random_uint8(32, num=2)
    assert torch.equal(inception_input(images, "clean"), clean_resize(images))


@pytest.mark.parametrize("device", DEVICES)
def test_inception_features_read_the_device_input(device):
    """The extractor feeds its network what the host path made (a stand-in network in the loader's cache entry)."""
    projection = torch.randn(3 * 13 * 13, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    network = lambda x: torch.nn.functional.avg_pool2d(x.double(), 23).flatten(1) @ projection.to(x.device)
    ctx = MetricContext(fid_mode="edm", device=device)
    ctx.cache["inception"] = (network, {"weights": "stand-in"})
    images = random_uint8(32, num=4)
    expected = network(host_inception_input(images)).numpy()
    features = InceptionFeatures(ctx).extract(images)
    if device == "cpu":
        np.testing.assert_array_equal(features, expected)
    else:
        np.testing.assert_allclose(features, expected, rtol=1e-5)


def toy_generator(z: torch.Tensor, cond) -> torch.Tensor:
    """[-1, 1] images that land on every rounding boundary of the uint8 quantisation, and beyond the range."""
    return torch.cat([torch.tanh(z[:, :1]), (torch.round(z[:, 1:] * 200) / 127.5 - 1) * 1.01], dim=1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generator_source_quantises_as_written_files(precision):
    """generator_source quantises on the generating device; on the CPU it gives what write_samples writes."""
    from onestep_cli.sampling import generate

    seeds, shape = list(range(5)), (3, 8, 8)
    source = generator_source(toy_generator, seeds, shape, precision=precision)
    images = np.concatenate([batch for _, batch in source.batches(2)])
    if precision == "fp32":
        np.testing.assert_array_equal(images, to_uint8_images(generate(toy_generator, seeds, shape)))
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = to_uint8_images(generate(toy_generator, seeds, shape))
        np.testing.assert_array_equal(images, expected)


def test_grey_generators_give_three_channels():
    source = generator_source(lambda z, cond: torch.tanh(z), [0, 1], (1, 4, 4))
    images = next(source.batches(2))[1]
    assert images.shape == (2, 4, 4, 3) and (images[..., 0] == images[..., 2]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_quantisation_on_cuda_gives_the_cpus_bits():
    """Every value k / 127.5 - 1 and the midpoints between them, nudged by one float32 step either way."""
    centres = torch.arange(-2, 513, dtype=torch.float32) / 255 - 1
    values = torch.cat([centres, torch.nextafter(centres, centres + 1), torch.nextafter(centres, centres - 1)])
    values = torch.cat([values, torch.tensor([-1.5, 1.5, -0.0])])
    images = values[: values.numel() // 3 * 3].reshape(1, 3, 1, -1)
    np.testing.assert_array_equal(as_uint8_nhwc(images.cuda()), as_uint8_nhwc(images))
