"""Work counted once per benchmark row: matrix-product FLOPs and the bytes those products must move.

FLOPs come from torch.utils.flop_counter (convolutions, matrix products, attention, their backward passes;
element-wise work and the scores that fused attention kernels recompute in their backward are not counted). The byte
count is a floor for an implementation that runs each matrix product (or fused attention) as its own kernel: every
operand read once and every result written once, in bf16 (2 bytes per element).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # The gradients of the two products, twice the forward; PyTorch's own formula adds the scores that the fused
    # kernels recompute, which the model does not ask for and the math backend does not do.
    return 2 * flop_counter.sdpa_flop_count(query, key, value)


# SDPA counted as its two matrix products whichever kernel runs it: torch.utils.flop_counter has no formula for the
# CPU flash kernel, and counts the CUDA kernels' backward with their recomputation.
ATTENTION_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                   **dict.fromkeys([_aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                    _aten._scaled_dot_product_flash_attention_backward,
                                    _aten._scaled_dot_product_efficient_attention_backward,
                                    _aten._scaled_dot_product_cudnn_attention_backward], _attention_backward_flops)}
MATRIX_OPS = {_aten.convolution, _aten.convolution_backward, _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm,
              _aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_efficient_attention,
              _aten._scaled_dot_product_cudnn_attention, *ATTENTION_FLOPS}
BF16_BYTES = 2


class MatrixOperandBytes(TorchDispatchMode):
    """Counts the elements every matrix product reads (tensor arguments) and writes (tensor results)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MATRIX_OPS:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.elements += sum(t.numel() for t in tensors)
        return out


@dataclass(frozen=True)
class Work:
    """Work of one benchmark iteration on `batch` images: a part per image plus a part per call (the weights each
    matrix product reads, whatever the batch)."""

    flops_per_image: float  # Matrix-product FLOPs (multiply-add = 2) that grow with the batch.
    flops_fixed: float
    bytes_per_image: float  # Matrix-product operands and results, once each, in bf16.
    bytes_fixed: float

    def flops(self, batch: int) -> float:
        """FLOPs per image at `batch`."""
        return self.flops_per_image + self.flops_fixed / batch

    def bytes(self, batch: int) -> float:
        """Bytes per image at `batch`."""
        return self.bytes_per_image + self.bytes_fixed / batch

    def floor_seconds(self, batch: int, peak_flops: float, bandwidth: float) -> float:
        """Per image: the larger of FLOPs over the matrix rate and bytes over memory bandwidth."""
        return max(self.flops(batch) / peak_flops, self.bytes(batch) / bandwidth)


def count_work(iteration_at) -> Work:
    """Count `iteration_at(batch)()` at batch 1 and 2, and split the work into a part per image and a fixed part."""
    counts = []
    for batch in (1, 2):
        run_once = iteration_at(batch)
        bytes_mode = MatrixOperandBytes()
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as flops, bytes_mode:
            run_once()
        counts.append((flops.get_total_flops(), bytes_mode.elements * BF16_BYTES))
    (flops_1, bytes_1), (flops_2, bytes_2) = counts
    return Work(flops_2 - flops_1, max(2 * flops_1 - flops_2, 0), bytes_2 - bytes_1, max(2 * bytes_1 - bytes_2, 0))
