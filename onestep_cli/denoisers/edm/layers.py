"""Building blocks of the EDM U-Nets (DDPM++, NCSN++, ADM), written to match EDM's parameter layout and arithmetic.

Attribute names, registration order and the order of floating-point operations follow EDM's `training/networks.py`
so that an EDM state dict loads one-to-one and every layer but the attention gives bit-identical results on the same
device (on the CPU; DDPM++'s 2x2 box resampling runs as pooling, whose GPU kernels may sum the four taps in another
order). The attention runs through PyTorch's `scaled_dot_product_attention` (flash attention on CUDA in 16 bits),
equal to EDM's einsums to float rounding.
Weights are cast to the activation dtype inside each layer, so a float32 module runs float16 inputs unchanged.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.functional import silu


def weight_init(shape: list[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A random tensor of `shape` drawn with one of EDM's init modes (xavier/kaiming, uniform/normal)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"init_mode {mode!r} is not one of xavier_uniform, xavier_normal, kaiming_uniform, "
                     f"kaiming_normal.")


class Linear(nn.Module):
    """Fully-connected layer `x @ W^T + b`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # matmul then in-place add (not F.linear): the same rounding as EDM.
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


class Conv2d(nn.Module):
    """Square convolution with optional 2x up- or downsampling by a separable FIR `resample_filter`.

    `kernel=0` gives a pure resampling layer with no weights (used by NCSN++'s auxiliary paths).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: list[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d takes up=True or down=True, not both.")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)
        # DDPM++'s [1, 1] filter: a 2x2 box. Its per-channel convolutions are 2x2 average pooling (down) and nearest
        # 2x upsampling (up), which run as memory-bound kernels instead of slow depthwise cuDNN ones.
        self.box_resample = list(resample_filter) == [1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv, conv_t = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d

        if self.fused_resample and self.up and w is not None:
            x = conv_t(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                       padding=max(f_pad - w_pad, 0))
            x = conv(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv(x, w, padding=w_pad + f_pad)
            x = conv(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up and self.box_resample:
                x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            elif self.up:
                # The filter is scaled by 4 so that upsampling by zero insertion keeps the mean.
                x = conv_t(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                           padding=f_pad)
            if self.down and self.box_resample:
                x = torch.nn.functional.avg_pool2d(x, 2)
            elif self.down:
                x = conv(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most `num_groups` groups and at least `min_channels_per_group` channels each,
    optionally followed by SiLU (`forward(x, silu=True)`), which EDM's blocks apply after most norms.

    Under autocast it normalises in its input's dtype, as EDM's fp16 networks do, rather than in autocast's float32:
    the kernel accumulates in float32 either way, and 16-bit outputs halve the bytes of every norm and of the SiLU and
    dropout after it (docs/benchmarks.md). `autocast_float32 = True` restores CUDA autocast's choice.

    On CUDA activations in channels_last, in a compiled or CUDA-graph-captured step, norm and SiLU run as our Triton
    kernels for NHWC (`group_norm_nhwc`): 17% faster SiD steps than NCHW (docs/benchmarks.md). Not eagerly outside a
    capture, where launching their six kernels from Python costs about 1 ms per norm, forward and backward, more than
    ATen's group_norm takes. `nhwc_kernels = False` falls back to ATen's group_norm (eager) or
    `group_norm_channels_last` (compiled).
    """

    autocast_float32 = False
    nhwc_kernels = True

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        autocasting = torch.is_autocast_enabled(x.device.type)
        if autocasting and self.autocast_float32:
            x = x.to(torch.float32)  # What CUDA autocast does to group_norm, spelled out so it holds on every device.
        with torch.autocast(x.device.type, enabled=False) if autocasting else contextlib.nullcontext():
            weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
            if self.nhwc_kernels and x.is_cuda and _channels_last(x) and _compiled_or_captured():
                from .group_norm_nhwc import group_norm_nhwc  # Imports triton, so only when it is needed.
                return group_norm_nhwc(x, self.num_groups, weight, bias, self.eps, silu)
            if torch.compiler.is_compiling() and _channels_last(x):
                x = group_norm_channels_last(x, self.num_groups, weight, bias, self.eps)
            else:
                x = torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=weight, bias=bias,
                                                   eps=self.eps)
        return torch.nn.functional.silu(x) if silu else x


def _compiled_or_captured() -> bool:
    return torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """group_norm of an NHWC-strided `x`, written on its `[N, HW, C]` view: compiled, every reduction runs over HW
    with the channels contiguous (coalesced), then over a group's channels, and nothing is copied to NCHW (inductor's
    own group_norm is). Two passes (mean, then the centred variance), in float32, rounded once, as the kernel."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c).float()  # A view of the NHWC memory.

    def over_groups(per_channel: torch.Tensor) -> torch.Tensor:  # [N, C] -> each group's mean, repeated per channel.
        groups = per_channel.view(n, num_groups, c // num_groups).mean(dim=2, keepdim=True)
        return groups.expand(n, num_groups, c // num_groups).reshape(n, 1, c)

    centred = rows - over_groups(rows.mean(dim=1))
    normalised = centred * torch.rsqrt(over_groups(centred.square().mean(dim=1)) + eps)
    return (normalised * weight.float() + bias.float()).to(x.dtype).reshape(n, h, w, c).permute(0, 3, 1, 2)


def self_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """EDM's multi-head self-attention over pixels (NVlabs/edm `training/networks.py` L182-184), as one call of
    `scaled_dot_product_attention`: per head `a = v softmax(q^T k / sqrt(c))^T`, c the channels per head.

    `qkv` [N, 3C, H, W] is the block's qkv convolution, whose channels EDM's reshape reads as (head, channel, q/k/v);
    the result [N, C, H, W] keeps qkv's memory format. On CUDA SDPA runs flash attention in 16 bits (the softmax in
    float32, as EDM's) and the memory-efficient kernel in float32; neither stores the HW x HW weights, forward or
    backward. Its fused kernels, on the CPU too, have no double backward: a loss that differentiates through the
    attention twice (none in onestep does) must run it under `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`.
    """
    n, channels, h, w = qkv.shape
    per_head = qkv.reshape(n, num_heads, channels // (3 * num_heads), 3, h * w)
    # One copy into [N, HW, heads, c] memory, viewed as SDPA's [N, heads, HW, c]: its fused kernels need each head's
    # channels contiguous (else it falls back to the math backend, which stores the weights).
    q, k, v = per_head.permute(3, 0, 4, 1, 2).contiguous().transpose(2, 3).unbind(0)
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # Default scale 1/sqrt(c), EDM's.
    # The kernels write the output in their inputs' [N, HW, heads, c] layout: an NHWC view, copied only for NCHW.
    a = a.transpose(2, 3).reshape(n, channels // 3, h, w)
    return a.contiguous(memory_format=torch.channels_last if _channels_last(qkv) else torch.contiguous_format)


class UNetBlock(nn.Module):
    """Residual block with timestep-embedding modulation, optional 2x resampling and optional self-attention.

    The union of the DDPM++, NCSN++ and ADM blocks; `adaptive_scale` selects ADM's scale-and-shift modulation.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter: list[int] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = init if init is not None else {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **resample, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when channels change (or when asked); otherwise resampling only.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, **resample, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """`skip`: the encoder activation a decoder block concatenates to `x` along channels. The concatenation is
        done here, inside the block, so that a compiled block also owns its backward (no strided copies between
        compiled regions)."""
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        orig = x
        x = self.conv0(self.norm0(x, silu=True))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = self.norm1(x.add_(params), silu=True)

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            x = self.proj(self_attention(self.qkv(self.norm2(x)), self.num_heads)).add_(x)
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding `[cos(x f), sin(x f)]` with geometric frequencies (DDPM++, ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features `[cos(2 pi x f), sin(2 pi x f)]` with fixed Gaussian frequencies (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
