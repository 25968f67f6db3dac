"""EDM networks: parameter layout and outputs recorded from NVlabs/edm, and the preconditioning maths.

`tests/fixtures/edm_reference.json` was written by `tests/fixtures/edm_make_reference.py` from EDM's own
`training/networks.py` (see docs/edm.md): for each config below, the state-dict keys and shapes of EDM's module and
its output on the weights from `fill_weights` and the inputs from `make_inputs`. Those two helpers use a hash, not a
random number generator, so the numbers do not depend on torch's RNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from onestep_cli.denoisers.edm import (EDMLoadError, EDMPrecond, VEPrecond, VPPrecond, build_precond,
                                       load_edm_weights, save_edm_weights)
from onestep_cli.denoisers.edm import layers

REFERENCE = Path(__file__).parent / "fixtures" / "edm_reference.json"

SONG = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
ADM = dict(model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
NCSNPP = dict(embedding_type="fourier", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])

# Small versions of EDM's ddpmpp / ncsnpp / adm configs (train.py), conditional and not, under each preconditioning.
CONFIGS = {
    "ddpmpp_uncond_edm": ("EDMPrecond", dict(**SONG, dropout=0.1)),
    "ddpmpp_cond_aug_vp": ("VPPrecond", dict(**SONG, label_dim=10, augment_dim=9, label_dropout=0.1)),
    "ncsnpp_uncond_ve": ("VEPrecond", dict(**SONG, **NCSNPP, encoder_type="residual")),
    "ncsnpp_skip_cond_edm": ("EDMPrecond", dict(SONG, **NCSNPP, channel_mult=[1, 2, 2], encoder_type="skip",
                                                decoder_type="skip", label_dim=10)),
    "adm_uncond_edm": ("EDMPrecond", dict(**ADM)),
    "adm_cond_aug_edm": ("EDMPrecond", dict(ADM, channel_mult=[2, 4], attn_resolutions=[8, 4], label_dim=10,
                                            augment_dim=9, use_fp16=True)),
}
IMG_RESOLUTION, IMG_CHANNELS, BATCH = 8, 3, 2


def init_kwargs(name: str) -> dict:
    """Full constructor arguments of config `name`."""
    return dict(img_resolution=IMG_RESOLUTION, img_channels=IMG_CHANNELS, **CONFIGS[name][1])


def hash_uniform(count: int, seed: int) -> torch.Tensor:
    """`count` numbers in [-1, 1) from the sin hash `frac(sin(12.9898 i + 78.233 seed) * 43758.5453)`, float64."""
    i = torch.arange(count, dtype=torch.float64)
    u = torch.frac(torch.sin(12.9898 * i + 78.233 * seed).abs() * 43758.5453)
    return 2 * u - 1


def fill_weights(net: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter and buffer (except the fixed resampling filters) with hash values of sane scale."""
    state = net.state_dict()
    for index, (name, tensor) in enumerate(state.items()):
        if name.endswith("resample_filter"):
            continue
        values = hash_uniform(tensor.numel(), seed * 1000 + index).reshape(tensor.shape)
        if tensor.ndim >= 2:
            values = values * math.sqrt(3 / tensor[0].numel())  # unit-variance outputs for unit-variance inputs
        elif name.endswith("freqs"):
            values = values * 16  # the scale of EDM's Fourier frequencies
        elif "norm" in name and name.endswith("weight"):
            values = 1 + 0.2 * values
        else:
            values = 0.2 * values
        state[name] = values.to(tensor.dtype)
    net.load_state_dict(state)


def make_inputs(name: str, seed: int = 1) -> dict:
    """Keyword arguments `x`, `sigma`, `cond`, `augment_labels` for config `name` (cond/augment None if unused)."""
    kwargs = CONFIGS[name][1]
    x = hash_uniform(BATCH * IMG_CHANNELS * IMG_RESOLUTION**2, seed).reshape(BATCH, IMG_CHANNELS, IMG_RESOLUTION,
                                                                             IMG_RESOLUTION)
    sigma = torch.tensor([0.05, 3.0], dtype=torch.float64)
    label_dim, augment_dim = kwargs.get("label_dim", 0), kwargs.get("augment_dim", 0)
    cond = torch.nn.functional.one_hot(torch.tensor([3, 7]), label_dim) if label_dim else None
    augment = hash_uniform(BATCH * augment_dim, seed + 1).reshape(BATCH, augment_dim) if augment_dim else None
    return dict(x=(x * (1 + sigma.reshape(-1, 1, 1, 1))).float(), sigma=sigma.float(),
                cond=None if cond is None else cond.float(),
                augment_labels=None if augment is None else (0.5 * augment).float())


def build(name: str) -> torch.nn.Module:
    """Config `name` built with our classes, filled by `fill_weights`, in eval mode."""
    net = build_precond(CONFIGS[name][0], init_kwargs(name))
    fill_weights(net)
    return net.eval()


# conftest.py: tiny convolutions gain nothing from threads, and on a busy 2-core machine spinning threads make them
# 100x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_layout_matches_edm(name, reference):
    net = build_precond(CONFIGS[name][0], init_kwargs(name))
    recorded = reference["configs"][name]
    assert recorded["class_name"] == CONFIGS[name][0] and recorded["init_kwargs"] == init_kwargs(name)
    assert [[key, list(value.shape)] for key, value in net.state_dict().items()] == recorded["state_dict"]


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_edm(name, reference):
    with torch.no_grad():
        out = build(name)(**make_inputs(name))
    expected = torch.tensor(reference["configs"][name]["output"]).reshape(out.shape)
    assert out.dtype == torch.float32
    # Recorded on the same CPU ops EDM runs; the tolerance only absorbs BLAS differences between machines.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_reference_outputs_are_not_trivial(reference):
    # Guards against a fixture of near-zero outputs that any network would match.
    for name, recorded in reference["configs"].items():
        inputs = make_inputs(name)
        out = torch.tensor(recorded["output"]).reshape(inputs["x"].shape)
        assert (out - inputs["x"]).abs().mean() > 1e-2, name


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_scalings_closed_form(sigma_data):
    net = EDMPrecond(8, 3, sigma_data=sigma_data, **SONG)
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = net.scalings(sigma)
    total = sigma**2 + sigma_data**2
    torch.testing.assert_close(c_skip, sigma_data**2 / total)
    torch.testing.assert_close(c_out, sigma * sigma_data / total.sqrt())
    torch.testing.assert_close(c_in, 1 / total.sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # Karras et al.'s design goals: unit-variance network input and unit-variance training target
    # (x0 - c_skip x) / c_out for x0 of standard deviation s_d and x = x0 + sigma n.
    ones = torch.ones_like(sigma)
    torch.testing.assert_close(c_in**2 * total, ones)
    torch.testing.assert_close(((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * sigma**2) / c_out**2, ones)


def test_vp_and_ve_scalings_closed_form():
    sigma = torch.tensor([0.01, 0.5, 5.0, 150.0], dtype=torch.float64)
    vp = VPPrecond(8, 3, **SONG)
    c_skip, c_out, c_in, c_noise = vp.scalings(sigma)
    t = c_noise / (vp.M - 1)
    torch.testing.assert_close(c_skip, torch.ones_like(sigma))
    torch.testing.assert_close(c_out, -sigma)
    torch.testing.assert_close(c_in, 1 / (1 + sigma**2).sqrt())
    # c_noise is (M - 1) t with t the schedule time of sigma: sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1).
    torch.testing.assert_close(((0.5 * vp.beta_d * t**2 + vp.beta_min * t).exp() - 1).sqrt(), sigma)
    # EDM computes sigma(epsilon_t) in float32, where exp(x) - 1 cancels: 0.000977 instead of the exact 0.0010005.
    # We keep EDM's value so that samplers reading sigma_min match EDM's.
    assert vp.sigma_min == 2**-10
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), rel=0.03)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), rel=1e-5)

    c_skip, c_out, c_in, c_noise = VEPrecond(8, 3, **SONG).scalings(sigma)
    torch.testing.assert_close(c_skip, torch.ones_like(sigma))
    torch.testing.assert_close(c_out, sigma)
    torch.testing.assert_close(c_in, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, (sigma / 2).log())


class _Probe(torch.nn.Module):
    """A stand-in U-Net that records its inputs and returns a constant 0.25."""

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        self.seen = (x, noise_labels, class_labels)
        return torch.full_like(x, 0.25)


@pytest.mark.parametrize("precond", [EDMPrecond, VPPrecond, VEPrecond])
def test_forward_applies_scalings(precond):
    net = precond(8, 3, label_dim=4, **SONG)
    net.model = _Probe()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 7.0])
    out = net(x, sigma)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in net.scalings(sigma.reshape(-1, 1, 1, 1)))
    torch.testing.assert_close(out, c_skip * x + c_out * 0.25)
    torch.testing.assert_close(net.model.seen[0], c_in * x)
    torch.testing.assert_close(net.model.seen[1], c_noise.flatten())
    assert torch.equal(net.model.seen[2], torch.zeros(1, 4))  # no labels = the all-zero label row


def test_edm_precond_is_identity_at_tiny_sigma():
    net = build("adm_uncond_edm")
    x = make_inputs("adm_uncond_edm")["x"]
    torch.testing.assert_close(net(x, torch.full([2], 1e-6)), x, rtol=1e-5, atol=1e-5)


def test_sigma_shapes_agree():
    net = build("ddpmpp_uncond_edm")
    x = make_inputs("ddpmpp_uncond_edm")["x"]
    out = net(x, torch.tensor([1.5, 1.5]))
    for sigma in (torch.tensor(1.5), 1.5, torch.full([2, 1, 1, 1], 1.5)):
        torch.testing.assert_close(net(x, sigma), out)


def test_labels_and_augment_checks():
    cond_net = build("ddpmpp_cond_aug_vp")
    inputs = make_inputs("ddpmpp_cond_aug_vp")
    no_labels = cond_net(inputs["x"], inputs["sigma"])
    zero_labels = cond_net(inputs["x"], inputs["sigma"], torch.zeros(2, 10))
    torch.testing.assert_close(no_labels, zero_labels)
    assert not torch.allclose(cond_net(**inputs), zero_labels)

    uncond_net = build("ddpmpp_uncond_edm")
    with pytest.raises(ValueError, match="unconditional"):
        uncond_net(inputs["x"], inputs["sigma"], torch.zeros(2, 10))
    with pytest.raises(ValueError, match="augment_dim=0"):
        uncond_net(inputs["x"], inputs["sigma"], augment_labels=torch.zeros(2, 9))


def test_label_dropout_one_gives_the_unconditional_output():
    kwargs = dict(init_kwargs("ddpmpp_cond_aug_vp"), label_dropout=1.0, dropout=0.0)
    net = build_precond("VPPrecond", kwargs)
    fill_weights(net)
    inputs = make_inputs("ddpmpp_cond_aug_vp")
    dropped = net.train()(**inputs)
    unconditional = net.eval()(inputs["x"], inputs["sigma"], augment_labels=inputs["augment_labels"])
    torch.testing.assert_close(dropped, unconditional)


def test_dropout_is_active_only_in_training():
    net = build("ddpmpp_uncond_edm")
    inputs = make_inputs("ddpmpp_uncond_edm")
    assert torch.equal(net(**inputs), net(**inputs))
    net.train()
    assert not torch.equal(net(**inputs), net(**inputs))


def test_bf16_autocast_runs_and_returns_float32():
    net = build("adm_cond_aug_edm")
    inputs = make_inputs("adm_cond_aug_edm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(**inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net(**inputs), rtol=0.1, atol=0.1)


def edm_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """EDM's attention as its code computes it (NVlabs/edm training/networks.py L116 and L182-184): the softmax in
    float32, the weights in the input dtype; in float32 autograd's softmax backward is EDM's AttentionOp backward."""
    n, channels, h, w = qkv.shape
    q, k, v = qkv.reshape(n * num_heads, channels // (3 * num_heads), 3, -1).unbind(2)
    weights = torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(k.shape[1])).float()).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", weights.to(q.dtype), v).reshape(n, channels // 3, h, w)


@pytest.mark.parametrize("name", ["ddpmpp_uncond_edm", "adm_cond_aug_edm"])  # One head at 4x4; 2 and 4 heads.
def test_sdpa_attention_equals_edm_einsums_in_output_and_gradients(name, monkeypatch):
    net = build(name)
    inputs = make_inputs(name)
    parameters = list(net.parameters())

    def output_and_gradients():
        x = inputs["x"].clone().requires_grad_(True)
        out = net(**dict(inputs, x=x))
        return out, torch.autograd.grad(out.square().sum(), [x, *parameters], allow_unused=True)

    ours, our_grads = output_and_gradients()
    calls = []
    monkeypatch.setattr(layers, "self_attention", lambda qkv, heads: calls.append(heads) or edm_attention(qkv, heads))
    edm, edm_grads = output_and_gradients()
    assert calls and any(heads > 1 for heads in calls) == (name == "adm_cond_aug_edm")
    torch.testing.assert_close(ours, edm, rtol=1e-5, atol=1e-5)
    assert [g is None for g in our_grads] == [g is None for g in edm_grads]
    for our_grad, edm_grad in zip(our_grads, edm_grads):
        if our_grad is not None:  # Float32 rounding of sums over many pixels, relative to the gradient's scale.
            torch.testing.assert_close(our_grad, edm_grad, rtol=1e-5, atol=1e-5 * edm_grad.abs().max().item())
    # The attention matters to these outputs: without it they move by far more than the tolerance.
    monkeypatch.setattr(layers, "self_attention", lambda qkv, heads: torch.zeros_like(qkv[:, : qkv.shape[1] // 3]))
    with torch.no_grad():
        assert (net(**inputs) - edm).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_keeps_the_layout_and_edm_16_bit_arithmetic(dtype):
    qkv = torch.randn(2, 3 * 4 * 8, 4, 6, generator=torch.Generator().manual_seed(0)).to(dtype)  # 4 heads of 8.
    expected = edm_attention(qkv, num_heads=4)
    ours = layers.self_attention(qkv, num_heads=4)
    assert ours.dtype == dtype and ours.is_contiguous()
    nhwc = layers.self_attention(qkv.contiguous(memory_format=torch.channels_last), num_heads=4)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, ours)
    # bf16: both take the softmax in float32 but round to bf16 at different points.
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours, expected, **tolerance)


def test_double_backward_through_the_attention_runs_on_the_math_backend():
    # What self_attention's docstring tells a loss that differentiates twice (a gradient penalty) to do.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = torch.randn(2, 3 * 2 * 8, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        (grad,) = torch.autograd.grad(layers.self_attention(qkv, 2).square().sum(), qkv, create_graph=True)
        grad.square().sum().backward()
    with sdpa_kernel(SDPBackend.MATH):
        (grad,) = torch.autograd.grad(layers.self_attention(qkv, 2).square().sum(), qkv, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), qkv)
    qkv64 = qkv.detach().double().requires_grad_(True)
    (reference,) = torch.autograd.grad(edm_attention(qkv64, 2).square().sum(), qkv64, create_graph=True)
    torch.testing.assert_close(second, torch.autograd.grad(reference.square().sum(), qkv64)[0].float(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ncsnpp_skip_cond_edm", "adm_cond_aug_edm", "ddpmpp_cond_aug_vp"])
def test_safetensors_round_trip_is_exact(name, tmp_path):
    net = build(name)
    save_edm_weights(net, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["class_name"] == CONFIGS[name][0]
    loaded = load_edm_weights(tmp_path / "export")
    assert type(loaded) is type(net) and not loaded.training
    inputs = make_inputs(name)
    assert torch.equal(loaded(**inputs), net(**inputs))


def test_load_edm_weights_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_edm_weights(tmp_path)
    save_edm_weights(build("adm_uncond_edm"), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(format="something-else")))
    with pytest.raises(EDMLoadError, match=r"config\.json is not an onestep EDM config"):
        load_edm_weights(tmp_path)
    with pytest.raises(TypeError, match="EDMPrecond"):
        save_edm_weights(torch.nn.Linear(2, 2), tmp_path)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_box_resampling_equals_edm_depthwise_filter_in_value_and_gradient(direction):
    # DDPM++'s [1, 1] filter runs as average pooling / nearest upsampling; EDM runs it as a depthwise convolution.
    from onestep_cli.denoisers.edm.layers import Conv2d

    layer = Conv2d(in_channels=4, out_channels=4, kernel=0, resample_filter=[1, 1], **{direction: True})
    assert layer.box_resample
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    fast = layer(x)
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)
    layer.box_resample = False  # EDM's depthwise (transposed) convolution with the 2x2 filter.
    slow = layer(x)
    (slow_grad,) = torch.autograd.grad(slow.square().sum(), x)
    assert fast.shape == slow.shape == ((2, 4, 16, 16) if direction == "up" else (2, 4, 4, 4))
    # The filter's taps are powers of two: both ways round identically on the CPU (the summation order on a GPU may
    # differ in the last bit).
    assert torch.equal(fast, slow) and torch.equal(fast_grad, slow_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_on_the_nhwc_view_equals_group_norm(dtype):
    # What a compiled GroupNorm runs on channels_last activations (inductor's own group_norm copies them to NCHW).
    from onestep_cli.denoisers.edm.layers import group_norm_channels_last

    torch.manual_seed(0)
    x = (3 * torch.randn(4, 64, 8, 8) + 1).to(dtype).to(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.randn(64, dtype=dtype, requires_grad=True), torch.randn(64, dtype=dtype, requires_grad=True)
    ours = group_norm_channels_last(x, 16, weight, bias, 1e-5)
    reference = torch.nn.functional.group_norm(x, 16, weight, bias, 1e-5)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    # Both compute in float32 and round once: bfloat16 outputs agree to one rounding step (2^-7, relative).
    torch.testing.assert_close(ours, reference, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    upstream = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, weight, bias), upstream),
                    torch.autograd.grad(reference, (x, weight, bias), upstream)):
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= (1e-2 if dtype == torch.bfloat16 else 1e-5) * scale
