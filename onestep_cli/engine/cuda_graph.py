"""Replay a whole training iteration as one CUDA graph (`train.cuda_graph`).

An eager step launches some ten thousand kernels from Python, and the GPU waits whenever the host falls behind: 13%
of a DDPM++ CIFAR-10 SiD step at batch 128 on an H100, most of a small network's step (docs/benchmarks.md). A CUDA
graph records every kernel of the step once and replays them with one launch; it is also what lets torch.compile's
fused kernels pay off. What it needs, and how this module provides it:

- Static shapes and addresses: the step's inputs that come from the host (the noise levels, drawn on the CPU) are
  copied into tensors allocated once; everything else the step allocates lives in the graph's private memory pool.
- No host synchronisation inside the step: the trainer's deferred checks (`Trainer.defer_checks`) let the fused
  optimizer skip a non-finite update on the GPU and count skipped steps on the GPU.
- Random numbers: the training generator is registered with the graph, so each replay draws fresh latents and noise
  from the same stream an eager step would; dropout draws from the default CUDA generator, registered by torch.
- Warm-up: the first steps run eagerly on a side stream (cuDNN, autograd and the optimizer's state initialise
  lazily), then the next step is captured and replayed.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

WARMUP_STEPS = 2  # Eager steps before capture; torch's documentation uses a few, enough to create every lazy state.


class StepGraph:
    """Runs `step(inputs) -> dict of tensors` eagerly for WARMUP_STEPS calls, then as a captured CUDA graph.

    `inputs` is a list of tensors of fixed shapes (host or device); each call copies them into static device
    buffers. `generators`: the custom CUDA generators the step draws from. If capture fails, a warning says why and
    the step stays eager for good.
    """

    def __init__(self, step: Callable[[list[torch.Tensor]], dict], device: torch.device,
                 generators: list[torch.Generator]):
        self.step, self.device, self.generators = step, device, generators
        self.static_inputs: list[torch.Tensor] | None = None
        self.static_outputs: dict | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False  # Capture failed: every later call runs the step eagerly.
        self.calls = 0
        self.side_stream = torch.cuda.Stream(device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def reset(self) -> None:
        """Forget the graph (state tensors were replaced, e.g. an optimizer's on load): warm up and capture again."""
        self.graph, self.static_outputs, self.calls = None, None, 0

    def __call__(self, inputs: list[torch.Tensor]) -> dict:
        if self.static_inputs is None:
            self.static_inputs = [torch.empty(x.shape, dtype=x.dtype, device=self.device) for x in inputs]
        for static, value in zip(self.static_inputs, inputs):
            if value.device.type == "cpu":  # From pinned memory the copy is asynchronous: no host sync.
                value = value.pin_memory()
            static.copy_(value, non_blocking=True)
        self.calls += 1
        if self.eager or self.calls <= WARMUP_STEPS:
            return self._eager()
        if self.graph is None:
            self._capture()
            if self.graph is None:
                return self._eager()
        self.graph.replay()
        # The next replay overwrites the static outputs: hand out copies.
        return {key: value.clone() for key, value in self.static_outputs.items()}

    def _eager(self) -> dict:
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            outputs = self.step(self.static_inputs)
        current.wait_stream(self.side_stream)
        return outputs

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(graph):
                self.static_outputs = self.step(self.static_inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure: say why and stay eager.
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self.eager, self.static_outputs = True, None
            torch.cuda.synchronize(self.device)
            warnings.warn(f"CUDA graph capture failed ({reason}); the step runs eagerly. Set train.cuda_graph=false "
                          "to skip the attempt.", stacklevel=3)
            return
        self.graph = graph
