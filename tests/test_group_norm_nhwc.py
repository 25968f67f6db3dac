"""The Triton GroupNorm(+SiLU) kernels for channels_last activations against ATen's group_norm in float64.

On the CPU the kernels run in Triton's interpreter, which must be switched on before triton is imported: the cases
run in a child process with TRITON_INTERPRET=1 (this file, run as a script), which prints their errors as JSON.
The interpreter does not type-check, so every launch the cases and the EDM networks' norms make is compiled for a
Hopper GPU (sm_90, to a cubin) on the CPU, where no GPU is needed. On a GPU the same cases run compiled, and the
DDPM++ network in channels_last (using the kernels) is compared with itself in NCHW (using ATen's group_norm),
captured as a CUDA graph and under torch.compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (batch, channels, height, width, groups, silu, dtype, input mean): channels per group 4, 3 and 12 (not powers of
# two), one tile per sample, several tiles per block, a partial last tile and block (6x6 and 40x40 at 512 channels),
# more blocks than one merge chunk (40x40), and a mean 100x the spread (no sum-of-squares cancellation).
CASES = [
    (2, 48, 8, 8, 12, False, "float32", 1.0),
    (2, 96, 4, 4, 32, True, "float32", 1.0),
    (2, 384, 8, 8, 32, True, "float32", 1.0),
    (1, 512, 6, 6, 32, False, "float32", 1.0),
    (1, 512, 40, 40, 32, True, "float32", 1.0),
    (2, 128, 8, 8, 32, False, "float32", 100.0),
    (3, 64, 8, 8, 32, True, "bfloat16", 1.0),
    (2, 256, 4, 4, 32, True, "float16", 1.0),
]


def case_errors(case, device: str) -> dict[str, float]:
    """Largest error of the kernels' output and gradients relative to the float64 reference's largest entry."""
    from onestep_cli.denoisers.edm.group_norm_nhwc import group_norm_nhwc

    batch, channels, height, width, groups, silu, dtype, mean = case
    dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(channels + height)
    x = torch.randn(batch, channels, height, width, generator=generator) * 3 + mean
    weight, bias, upstream = (torch.randn(channels, generator=generator), torch.randn(channels, generator=generator),
                              torch.randn(batch, channels, height, width, generator=generator))
    inputs = [t.to(device, dtype) for t in (x, weight, bias)]
    inputs[0] = inputs[0].to(memory_format=torch.channels_last)
    inputs = [t.requires_grad_() for t in inputs]
    ours = group_norm_nhwc(inputs[0], groups, inputs[1], inputs[2], 1e-5, silu)
    ours_grads = torch.autograd.grad(ours, inputs, upstream.to(device, dtype))
    exact = [t.detach().cpu().double().requires_grad_() for t in inputs]
    reference = torch.nn.functional.group_norm(exact[0], groups, exact[1], exact[2], 1e-5)
    reference = torch.nn.functional.silu(reference) if silu else reference
    reference_grads = torch.autograd.grad(reference, exact, upstream.double())
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.detach().cpu().double() - b).abs().max() / b.abs().max()).item()

    return dict(zip(["output", "x", "weight", "bias"],
                    [error(ours, reference)] + [error(a, b) for a, b in zip(ours_grads, reference_grads)]))


def tolerance(dtype: str) -> float:
    # float32: a few roundings of values and float32 sums (~1e-7 measured); 16-bit: one rounding of the stored
    # output and of the inputs' gradient (2^-8 relative for bfloat16, 2^-11 for float16) plus the same of the inputs.
    return {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}[dtype]


def test_kernels_in_the_interpreter_match_group_norm_and_its_gradients():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    errors = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(errors) == len(CASES)
    for case, case_error in zip(CASES, errors):
        assert max(case_error.values()) < tolerance(case[6]), (case, case_error)


TRITON_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def recorded_launches(monkeypatch) -> list[tuple]:
    """Every kernel launch (kernel, arguments, launch settings) of a forward and backward over the cases and every
    norm of the DDPM++ CIFAR-10 and ADM ImageNet-64 networks (in bfloat16, as training runs them), recorded instead
    of run."""
    from onestep_cli.bench.rows import group_norm_shapes
    from onestep_cli.denoisers.edm import group_norm_nhwc as kernels

    launches = []
    monkeypatch.setattr(kernels, "_launch", lambda kernel, grid, *args, **meta: launches.append((kernel, args, meta)))
    shapes = [(2, c, h, w, groups, silu, getattr(torch, dtype)) for (_, c, h, w, groups, silu, dtype, _) in CASES]
    for network in ("ddpmpp-cifar10", "adm-imagenet64"):
        shapes += [(2, c, h, w, groups, True, torch.bfloat16) for c, h, w, groups in group_norm_shapes(network)]
    for n, c, h, w, groups, silu, dtype in shapes:
        x = torch.zeros(n, c, h, w, dtype=dtype).to(memory_format=torch.channels_last)
        weight, bias = torch.zeros(c, dtype=dtype), torch.zeros(c, dtype=dtype)
        _, mean, rstd = kernels._group_norm_nhwc(x, weight, bias, groups, 1e-5, silu)
        kernels._group_norm_nhwc_backward(x, x, weight, bias, mean, rstd, silu)
    return launches


def test_norm_shapes_of_the_edm_networks():
    from onestep_cli.bench.rows import group_norm_shapes

    # DDPM++ CIFAR-10: 128 channels in, 256 at every level; decoder inputs concatenate a skip (256 + 256, 256 + 128).
    assert group_norm_shapes("ddpmpp-cifar10") == [
        (128, 32, 32, 32), (256, 8, 8, 32), (256, 16, 16, 32), (256, 32, 32, 32), (384, 32, 32, 32), (512, 8, 8, 32),
        (512, 16, 16, 32), (512, 32, 32, 32)]
    # ADM ImageNet-64: 192 x [1, 2, 3, 4] channels at 64..8 pixels; the widest decoder input is 768 + 768 at 8x8.
    adm = group_norm_shapes("adm-imagenet64")
    assert (192, 64, 64, 32) in adm and max(adm) == (1536, 8, 8, 32) and len(adm) == 18


def test_every_launch_compiles_for_a_hopper_gpu(monkeypatch):
    # Triton's front end checks what the interpreter does not (a variable's type changing inside a loop, say),
    # and its NVIDIA back end (bundled ptxas) builds the cubin: all without a GPU.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = set()
    for kernel, args, meta in recorded_launches(monkeypatch):
        options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
        signature = {}
        for name, value in zip(kernel.arg_names, args):
            if isinstance(value, torch.Tensor):
                signature[name] = TRITON_TYPES[value.dtype]
            else:
                signature[name] = "fp32" if isinstance(value, float) else "i32"
        signature.update(dict.fromkeys(meta, "constexpr"))
        key = (kernel.__name__, tuple(signature.items()), tuple(meta.items()), tuple(options.items()))
        if key in compiled:
            continue
        binary = triton.compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32),
                                options=options)
        assert binary.asm["cubin"], key
        assert binary.metadata.shared <= 227 * 1024, key  # An H100's shared memory per block.
        compiled.add(key)
    assert {name for name, *_ in compiled} == {
        "group_norm_nhwc_tile_moments", "group_norm_nhwc_group_moments", "group_norm_nhwc_normalise",
        "group_norm_nhwc_gradient_sums", "group_norm_nhwc_gradient_means", "group_norm_nhwc_input_gradient"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA device")
@pytest.mark.parametrize("case", CASES)
def test_compiled_kernels_match_group_norm_and_its_gradients(case):
    errors = case_errors(case, "cuda")
    assert max(errors.values()) < tolerance(case[6]), errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA device")
@pytest.mark.parametrize("mode", ["captured", "compiled"])
def test_ddpmpp_in_channels_last_with_the_kernels_matches_nchw(mode, monkeypatch):
    # The kernels run where the step is compiled or captured as a CUDA graph (eager launches are host-bound).
    from onestep_cli.denoisers.edm import group_norm_nhwc as kernels
    from onestep_cli.denoisers.edm.networks import SongUNet

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # Float32 convolutions, both layouts.
    calls = []  # Counted while a graph is captured or dynamo traces: either way, the path was taken.
    unpatched = kernels.group_norm_nhwc
    monkeypatch.setattr(kernels, "group_norm_nhwc", lambda *args, **kw: calls.append(1) or unpatched(*args, **kw))
    torch.manual_seed(0)
    net = SongUNet(img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
                   attn_resolutions=[8], num_blocks=1, dropout=0).cuda()
    x, noise_labels = torch.randn(4, 3, 16, 16, device="cuda"), torch.rand(4, device="cuda")
    upstream = torch.randn(4, 3, 16, 16, device="cuda")

    def output_and_gradients(memory_format: torch.memory_format) -> list[torch.Tensor]:
        model = torch.compile(net) if mode == "compiled" else net
        inputs = x.to(memory_format=memory_format)

        def run() -> list[torch.Tensor]:
            out = model(inputs, noise_labels, class_labels=None)
            return [out, *torch.autograd.grad(out, list(net.parameters()), upstream)]

        if mode == "compiled":
            return run()
        side = torch.cuda.Stream()  # Warm up on a side stream, capture, replay: as train.cuda_graph does.
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        assert not calls
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        graph.replay()
        return [t.clone() for t in outputs]

    nchw = output_and_gradients(torch.contiguous_format)
    assert not calls
    nhwc = output_and_gradients(torch.channels_last)
    assert calls
    for a, b in zip(nhwc, nchw):  # float32 (TF32 off): summation order only.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


if __name__ == "__main__":  # The interpreter's child process: print each case's errors as one JSON line.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps([case_errors(case, "cpu") for case in CASES]))
