"""Which ATen operations a call dispatches: the CUDA-graph tests use it to find tensors built from host data.

torch.tensor(list) on a GPU copies from host memory, which a CUDA graph cannot record (capture then fails and the
step stays eager). Such constructions dispatch aten.lift_fresh on every device, so the CPU can check for them.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def tensors_from_host_data(call) -> list[str]:
    """The host-data constructions (`lift_fresh*` ops) that `call()` dispatches; fails if it dispatched nothing."""
    with _Recorder() as recorder:
        call()
    assert recorder.names, "the call dispatched no operation at all"
    return sorted(name for name in recorder.names if name.startswith("lift_fresh"))
