"""GroupNorm, optionally followed by SiLU, on channels_last (NHWC) activations: three Triton kernels each way.

Why our own: on channels_last activations cuDNN's convolutions need no layout transposes, but neither ATen's nor
inductor's group_norm reads NHWC well (ATen copies to NCHW; inductor's backward reductions over the NHWC view were
73 ms of a 447 ms SiD step). Here every load is a `[rows, channels]` tile of the `[N, HW, C]` view, channels
contiguous, and the SiLU after the norm is fused in both directions: the SiD step runs 17% faster than in NCHW
(docs/benchmarks.md, "Our Triton GroupNorm for NHWC").

The kernels, per sample `n`, tile of pixels (a few thousand elements) and block of tiles (up to 131072 elements):

1. `tile_moments` (n, block): each channel's mean and centred sum of squares over the block's pixels (from sums of
   `x - shift`, `shift` one of the block's pixels, so that the variance does not cancel);
2. `group_moments` (n): the blocks merged per channel, then the channels of each group (Chan's pairwise formula at
   both steps);
3. `normalise` (n, tile): `y = silu((x - mean) * rstd * weight + bias)`.

Backward, with `z` the affine output (SiLU's input) and `xhat = (x - mean) * rstd`:

4. `gradient_sums` (n, block): each channel's sums of `dz` and `dz * xhat` over the block;
5. `gradient_means` (n): those sums per channel (the weight and bias gradients, summed over samples), then each
   group's means of `dz * weight` and `dz * weight * xhat`;
6. `input_gradient` (n, tile): `dx = rstd * (dz * weight - mean(dz * weight) - xhat * mean(dz * weight * xhat))`.

The kernels compute in float32 and store in the input's dtype. With TRITON_INTERPRET=1 set before triton is imported
they run on CPU tensors in Triton's interpreter (the same kernel code, executed with NumPy), which is how the CPU test
suite checks them; otherwise on CUDA tensors, compiled.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Elements of one [rows, channels] tile: 16 float32 registers per thread at 8 warps, per tile-sized value.
TILE_ELEMENTS = 4096
# Elements a reduction program reads (a block of tiles): enough work per program to amortise its reduction across
# threads and its partial sums' stores (one program per tile made those kernels 4x slower than the element-wise ones;
# on an H200 131072 beat 65536 by 6% over DDPM++'s shapes, 262144 was no better; docs/benchmarks.md).
BLOCK_ELEMENTS = 131072
# The reduction kernels' launch: warps per program (0: as the element-wise kernels), Triton's software-pipelining
# depth for their loop over a block's tiles, and how many of those iterations are unrolled. Other values measured no
# faster on an H200; they stay settable for scripts/group_norm_nhwc_bench.py --variant.
REDUCTION_WARPS = 0
REDUCTION_STAGES = 3
REDUCTION_UNROLL = 1


@triton.jit
def _tile(n, tile, hw, c, ROWS: tl.constexpr, CHANNELS: tl.constexpr):
    """Offsets of tile `tile` of sample `n` in the [N, HW, C] view, and its mask."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    channels = tl.arange(0, CHANNELS)
    mask = (rows[:, None] < hw) & (channels[None, :] < c)
    offsets = (n * hw + rows[:, None]) * c + channels[None, :]
    return offsets, mask


@triton.jit
def _membership(channels, c, channels_per_group, GROUPS: tl.constexpr):
    """[CHANNELS, GROUPS] mask: which group each channel belongs to (groups are contiguous runs of channels)."""
    groups = tl.arange(0, GROUPS)
    return ((channels[:, None] // channels_per_group) == groups[None, :]) & (channels[:, None] < c), groups


@triton.jit
def _channel_affine(n, channels, c, channels_per_group, num_groups, group_mean_ptr, group_rstd_ptr, weight_ptr,
                    bias_ptr):
    """Each channel's index into the [N, G] per-group arrays, its group's mean and rstd, its weight and bias."""
    in_c = channels < c
    group = n * num_groups + channels // channels_per_group
    mean = tl.load(group_mean_ptr + group, mask=in_c, other=0.0)
    rstd = tl.load(group_rstd_ptr + group, mask=in_c, other=0.0)
    weight = tl.load(weight_ptr + channels, mask=in_c, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channels, mask=in_c, other=0.0).to(tl.float32)
    return group, mean, rstd, weight, bias


@triton.jit
def _pre_activation_gradient(dy, xhat, weight, bias, SILU: tl.constexpr):
    """The gradient at the affine output `z` from the gradient at the layer's output."""
    if SILU:
        z = xhat * weight[None, :] + bias[None, :]
        sig = tl.sigmoid(z)
        dz = dy * sig * (1 + z * (1 - sig))
    else:
        dz = dy
    return dz


@triton.jit
def group_norm_nhwc_tile_moments(x_ptr, tile_mean_ptr, tile_m2_ptr, hw, c, blocks, ROWS: tl.constexpr,
                                 STEPS: tl.constexpr, CHANNELS: tl.constexpr, UNROLL: tl.constexpr):
    n, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    channels = tl.arange(0, CHANNELS)
    first = block * ROWS * STEPS
    # Sums of x - shift, with shift a pixel of the block: the variance as accurate as a centred one, in one read.
    shift = tl.load(x_ptr + (n * hw + first) * c + channels, mask=channels < c, other=0.0).to(tl.float32)
    total = tl.zeros([ROWS, CHANNELS], tl.float32)
    squares = tl.zeros([ROWS, CHANNELS], tl.float32)
    # Element-wise accumulation; one reduction across threads at the end.
    for step in tl.range(0, STEPS, loop_unroll_factor=UNROLL):
        offsets, mask = _tile(n, block * STEPS + step, hw, c, ROWS, CHANNELS)
        shifted = tl.where(mask, tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - shift[None, :], 0.0)
        total += shifted
        squares += shifted * shifted
    count = tl.minimum(hw - first, ROWS * STEPS).to(tl.float32)
    shifted_sum = tl.sum(total, axis=0)
    m2 = tl.maximum(tl.sum(squares, axis=0) - shifted_sum * shifted_sum / count, 0.0)
    out = (n * blocks + block) * c + channels
    tl.store(tile_mean_ptr + out, shift + shifted_sum / count, mask=channels < c)
    tl.store(tile_m2_ptr + out, m2, mask=channels < c)


# The per-sample kernels take the block count as a compile-time constant (a loop bound; older Triton interpreters
# cannot loop to a runtime one): one compilation per activation shape, as the tile sizes already are.
@triton.jit
def group_norm_nhwc_group_moments(tile_mean_ptr, tile_m2_ptr, group_mean_ptr, group_rstd_ptr, hw, c,
                                  channels_per_group, num_groups, eps, BLOCKS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                                  CHANNELS: tl.constexpr, CHUNK: tl.constexpr, GROUPS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    channels = tl.arange(0, CHANNELS)
    weighted_sum = tl.zeros([CHANNELS], tl.float32)
    for start in range(0, BLOCKS, CHUNK):
        b = start + tl.arange(0, CHUNK)
        mask = (b[:, None] < BLOCKS) & (channels[None, :] < c)
        counts = tl.minimum(hw - b * BLOCK_ROWS, BLOCK_ROWS).to(tl.float32)
        means = tl.load(tile_mean_ptr + (n * BLOCKS + b[:, None]) * c + channels[None, :], mask=mask, other=0.0)
        weighted_sum += tl.sum(tl.where(mask, means * counts[:, None], 0.0), axis=0)
    channel_mean = weighted_sum / hw
    channel_m2 = tl.zeros([CHANNELS], tl.float32)
    for start in range(0, BLOCKS, CHUNK):
        b = start + tl.arange(0, CHUNK)
        mask = (b[:, None] < BLOCKS) & (channels[None, :] < c)
        counts = tl.minimum(hw - b * BLOCK_ROWS, BLOCK_ROWS).to(tl.float32)
        tile = (n * BLOCKS + b[:, None]) * c + channels[None, :]
        spread = tl.load(tile_mean_ptr + tile, mask=mask, other=0.0) - channel_mean[None, :]
        m2 = tl.load(tile_m2_ptr + tile, mask=mask, other=0.0) + counts[:, None] * spread * spread
        channel_m2 += tl.sum(tl.where(mask, m2, 0.0), axis=0)

    member, groups = _membership(channels, c, channels_per_group, GROUPS)
    group_mean = tl.sum(tl.where(member, channel_mean[:, None], 0.0), axis=0) / channels_per_group
    spread = channel_mean - tl.sum(tl.where(member, group_mean[None, :], 0.0), axis=1)
    group_m2 = tl.sum(tl.where(member, (channel_m2 + hw * spread * spread)[:, None], 0.0), axis=0)
    group_rstd = tl.rsqrt(group_m2 / (hw * channels_per_group) + eps)
    tl.store(group_mean_ptr + n * num_groups + groups, group_mean, mask=groups < num_groups)
    tl.store(group_rstd_ptr + n * num_groups + groups, group_rstd, mask=groups < num_groups)


@triton.jit
def group_norm_nhwc_normalise(x_ptr, weight_ptr, bias_ptr, group_mean_ptr, group_rstd_ptr, y_ptr, hw, c,
                              channels_per_group, num_groups, SILU: tl.constexpr, ROWS: tl.constexpr,
                              CHANNELS: tl.constexpr):
    n, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offsets, mask = _tile(n, tile, hw, c, ROWS, CHANNELS)
    channels = tl.arange(0, CHANNELS)
    _, mean, rstd, weight, bias = _channel_affine(n, channels, c, channels_per_group, num_groups, group_mean_ptr,
                                                  group_rstd_ptr, weight_ptr, bias_ptr)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean[None, :]) * (rstd * weight)[None, :] + bias[None, :]
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + offsets, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_nhwc_gradient_sums(dy_ptr, x_ptr, weight_ptr, bias_ptr, group_mean_ptr, group_rstd_ptr,
                                  tile_dz_ptr, tile_dz_xhat_ptr, hw, c, blocks, channels_per_group, num_groups,
                                  SILU: tl.constexpr, ROWS: tl.constexpr, STEPS: tl.constexpr,
                                  CHANNELS: tl.constexpr, UNROLL: tl.constexpr):
    n, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    channels = tl.arange(0, CHANNELS)
    in_c = channels < c
    _, mean, rstd, weight, bias = _channel_affine(n, channels, c, channels_per_group, num_groups, group_mean_ptr,
                                                  group_rstd_ptr, weight_ptr, bias_ptr)
    dz_total = tl.zeros([ROWS, CHANNELS], tl.float32)
    dz_xhat_total = tl.zeros([ROWS, CHANNELS], tl.float32)
    # Element-wise accumulation; one reduction across threads at the end.
    for step in tl.range(0, STEPS, loop_unroll_factor=UNROLL):
        offsets, mask = _tile(n, block * STEPS + step, hw, c, ROWS, CHANNELS)
        xhat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(mask, _pre_activation_gradient(dy, xhat, weight, bias, SILU), 0.0)
        dz_total += dz
        dz_xhat_total += dz * xhat
    out = (n * blocks + block) * c + channels
    tl.store(tile_dz_ptr + out, tl.sum(dz_total, axis=0), mask=in_c)
    tl.store(tile_dz_xhat_ptr + out, tl.sum(dz_xhat_total, axis=0), mask=in_c)


@triton.jit
def group_norm_nhwc_gradient_means(tile_dz_ptr, tile_dz_xhat_ptr, weight_ptr, channel_dz_ptr, channel_dz_xhat_ptr,
                                   mean_dz_ptr, mean_dz_xhat_ptr, hw, c, channels_per_group, num_groups,
                                   BLOCKS: tl.constexpr, CHANNELS: tl.constexpr, CHUNK: tl.constexpr,
                                   GROUPS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    channels = tl.arange(0, CHANNELS)
    in_c = channels < c
    dz = tl.zeros([CHANNELS], tl.float32)
    dz_xhat = tl.zeros([CHANNELS], tl.float32)
    for start in range(0, BLOCKS, CHUNK):
        b = start + tl.arange(0, CHUNK)
        mask = (b[:, None] < BLOCKS) & in_c[None, :]
        tile = (n * BLOCKS + b[:, None]) * c + channels[None, :]
        dz += tl.sum(tl.load(tile_dz_ptr + tile, mask=mask, other=0.0), axis=0)
        dz_xhat += tl.sum(tl.load(tile_dz_xhat_ptr + tile, mask=mask, other=0.0), axis=0)
    tl.store(channel_dz_ptr + n * c + channels, dz, mask=in_c)
    tl.store(channel_dz_xhat_ptr + n * c + channels, dz_xhat, mask=in_c)

    weight = tl.load(weight_ptr + channels, mask=in_c, other=0.0).to(tl.float32)
    member, groups = _membership(channels, c, channels_per_group, GROUPS)
    count = hw * channels_per_group
    mean_dz = tl.sum(tl.where(member, (weight * dz)[:, None], 0.0), axis=0) / count
    mean_dz_xhat = tl.sum(tl.where(member, (weight * dz_xhat)[:, None], 0.0), axis=0) / count
    tl.store(mean_dz_ptr + n * num_groups + groups, mean_dz, mask=groups < num_groups)
    tl.store(mean_dz_xhat_ptr + n * num_groups + groups, mean_dz_xhat, mask=groups < num_groups)


@triton.jit
def group_norm_nhwc_input_gradient(dy_ptr, x_ptr, weight_ptr, bias_ptr, group_mean_ptr, group_rstd_ptr, mean_dz_ptr,
                                   mean_dz_xhat_ptr, dx_ptr, hw, c, channels_per_group, num_groups,
                                   SILU: tl.constexpr, ROWS: tl.constexpr, CHANNELS: tl.constexpr):
    n, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offsets, mask = _tile(n, tile, hw, c, ROWS, CHANNELS)
    channels = tl.arange(0, CHANNELS)
    in_c = channels < c
    group, mean, rstd, weight, bias = _channel_affine(n, channels, c, channels_per_group, num_groups, group_mean_ptr,
                                                      group_rstd_ptr, weight_ptr, bias_ptr)
    mean_dz = tl.load(mean_dz_ptr + group, mask=in_c, other=0.0)
    mean_dz_xhat = tl.load(mean_dz_xhat_ptr + group, mask=in_c, other=0.0)
    xhat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dz = _pre_activation_gradient(dy, xhat, weight, bias, SILU)
    dx = rstd[None, :] * (dz * weight[None, :] - mean_dz[None, :] - xhat * mean_dz_xhat[None, :])
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _Tiling(NamedTuple):
    rows: int  # pixels per tile
    channels: int  # the channel count rounded up to a power of two
    tiles: int  # tiles per sample: the grid of the element-wise kernels
    steps: int  # tiles per block: the reduction kernels loop over a block's tiles
    blocks: int  # blocks per sample: the grid of the reduction kernels
    chunk: int  # blocks merged at a time by the per-sample kernels
    groups: int  # the group count rounded up to a power of two
    num_warps: int
    reduction_warps: int

    def reduction_launch(self) -> dict:
        """Launch settings shared by the two reduction kernels (tile_moments, gradient_sums)."""
        return dict(ROWS=self.rows, STEPS=self.steps, CHANNELS=self.channels, UNROLL=REDUCTION_UNROLL,
                    num_warps=self.reduction_warps, num_stages=REDUCTION_STAGES)

    def per_sample_launch(self) -> dict:
        """Launch settings shared by the two per-sample kernels (group_moments, gradient_means)."""
        return dict(BLOCKS=self.blocks, CHANNELS=self.channels, CHUNK=self.chunk, GROUPS=self.groups,
                    num_warps=self.num_warps)


def _tiling(hw: int, c: int, num_groups: int) -> _Tiling:
    channels = triton.next_power_of_2(c)
    rows = max(1, min(triton.next_power_of_2(hw), TILE_ELEMENTS // channels))
    tiles = triton.cdiv(hw, rows)
    steps = max(1, min(triton.next_power_of_2(tiles), BLOCK_ELEMENTS // (rows * channels)))
    blocks = triton.cdiv(tiles, steps)
    chunk = max(1, min(triton.next_power_of_2(blocks), TILE_ELEMENTS // channels))
    num_warps = 8 if rows * channels >= 4096 else 4
    return _Tiling(rows, channels, tiles, steps, blocks, chunk, triton.next_power_of_2(num_groups), num_warps,
                   REDUCTION_WARPS or num_warps)


def _block_partials(x: torch.Tensor, t: _Tiling) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 [N, blocks, C] buffers for a reduction kernel's per-block results."""
    first = x.new_empty((x.shape[0], t.blocks, x.shape[1]), dtype=torch.float32)
    return first, torch.empty_like(first)


def _launch(kernel: triton.JITFunction, grid: tuple[int, ...], *args, **meta) -> None:
    """Run `kernel` compiled on the GPU (visible to torch.compile), or in Triton's interpreter."""
    if isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 was set before triton was imported.
        kernel[grid](*args, **meta)
    elif args[0].is_cuda:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        raise ValueError("group_norm_nhwc runs on CUDA tensors, or on CPU tensors in Triton's interpreter "
                         "(TRITON_INTERPRET=1 set before triton is imported).")


@torch.library.triton_op("onestep::group_norm_nhwc", mutates_args=())
def _group_norm_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                     silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    t = _tiling(h * w, c, num_groups)
    tile_mean, tile_m2 = _block_partials(x, t)
    group_mean = x.new_empty((n, num_groups), dtype=torch.float32)
    group_rstd = torch.empty_like(group_mean)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    _launch(group_norm_nhwc_tile_moments, (n, t.blocks), x, tile_mean, tile_m2, h * w, c, t.blocks,
            **t.reduction_launch())
    _launch(group_norm_nhwc_group_moments, (n,), tile_mean, tile_m2, group_mean, group_rstd, h * w, c,
            c // num_groups, num_groups, eps, BLOCK_ROWS=t.rows * t.steps, **t.per_sample_launch())
    _launch(group_norm_nhwc_normalise, (n, t.tiles), x, weight, bias, group_mean, group_rstd, y, h * w, c,
            c // num_groups, num_groups, SILU=silu, ROWS=t.rows, CHANNELS=t.channels, num_warps=t.num_warps)
    return y, group_mean, group_rstd


@torch.library.triton_op("onestep::group_norm_nhwc_backward", mutates_args=())
def _group_norm_nhwc_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              group_mean: torch.Tensor, group_rstd: torch.Tensor,
                              silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    num_groups = group_mean.shape[1]
    dy = dy.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    t = _tiling(h * w, c, num_groups)
    tile_dz, tile_dz_xhat = _block_partials(x, t)
    channel_dz = x.new_empty((n, c), dtype=torch.float32)
    channel_dz_xhat = torch.empty_like(channel_dz)
    mean_dz = torch.empty_like(group_mean)
    mean_dz_xhat = torch.empty_like(group_mean)
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    _launch(group_norm_nhwc_gradient_sums, (n, t.blocks), dy, x, weight, bias, group_mean, group_rstd, tile_dz,
            tile_dz_xhat, h * w, c, t.blocks, c // num_groups, num_groups, SILU=silu, **t.reduction_launch())
    _launch(group_norm_nhwc_gradient_means, (n,), tile_dz, tile_dz_xhat, weight, channel_dz, channel_dz_xhat,
            mean_dz, mean_dz_xhat, h * w, c, c // num_groups, num_groups, **t.per_sample_launch())
    _launch(group_norm_nhwc_input_gradient, (n, t.tiles), dy, x, weight, bias, group_mean, group_rstd, mean_dz,
            mean_dz_xhat, dx, h * w, c, c // num_groups, num_groups, SILU=silu, ROWS=t.rows, CHANNELS=t.channels,
            num_warps=t.num_warps)
    return dx, channel_dz_xhat.sum(0).to(weight.dtype), channel_dz.sum(0).to(bias.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _num_groups, _eps, silu = inputs
    _y, group_mean, group_rstd = output
    ctx.save_for_backward(x, weight, bias, group_mean, group_rstd)
    ctx.silu = silu


def _backward(ctx, dy, _d_group_mean, _d_group_rstd):
    dx, d_weight, d_bias = _group_norm_nhwc_backward(dy, *ctx.saved_tensors, ctx.silu)
    return dx, d_weight, d_bias, None, None, None


_group_norm_nhwc.register_autograd(_backward, setup_context=_setup_context)


def group_norm_nhwc(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    silu: bool = False) -> torch.Tensor:
    """`group_norm(x)` (then `silu`, if asked) of a channels_last `x`, differentiable in `x`, `weight` and `bias`;
    the output is channels_last. `weight` and `bias` are in `x`'s dtype; statistics are float32."""
    if x.shape[1] % num_groups:
        raise ValueError(f"group_norm_nhwc: {x.shape[1]} channels do not split into {num_groups} groups.")
    return _group_norm_nhwc(x, weight, bias, num_groups, eps, silu)[0]
