"""Every configuration that train.compile, train.cuda_graph and train.channels_last at `auto` can pick, found by asking
engine/switches.py's `resolve_switches` over every case it tells apart (not copied from its table), so that the
tracking check (bench/tracking.py) covers each of them."""

from __future__ import annotations

import inspect
import itertools
import typing
from typing import NamedTuple

import torch

from ..config import TrainConfig
from ..engine.switches import FAMILY_NAMES, SWITCHES, resolve_switches
from ..runtime.precision import resolve_precision


class AutoChoice(NamedTuple):
    """One configuration `auto` picks: the precision it runs in and the switches on."""

    precision: str  # fp32, bf16 or fp16: train.precision as resolved on a CUDA device.
    compile: bool
    cuda_graph: bool
    channels_last: bool

    @property
    def name(self) -> str:
        """The precision, then the switches that are on: "bf16+compile+cuda_graph+channels_last", "fp16"."""
        return "+".join([self.precision, *(switch for switch in SWITCHES if getattr(self, switch))])


def cuda_precisions() -> tuple[str, ...]:
    """What each value of train.precision (auto included) runs in on a CUDA device."""
    choices = typing.get_args(TrainConfig.model_fields["precision"].annotation)
    return tuple(dict.fromkeys(resolve_precision(choice, torch.device("cuda")) for choice in choices))


def cases() -> dict[str, tuple]:
    """Each keyword argument of `resolve_switches` and the values that may change its choice: the devices, every
    precision, network family (and an unknown network), one process or several, DDP or FSDP, and each obstacle to
    the CUDA graph on or off. An argument missing here is an error, not a case left out."""
    known = {"device_type": ("cuda", "cpu"), "precision": cuda_precisions(), "family": (*FAMILY_NAMES, "other"),
             "world_size": (1, 2), "parallelism": ("ddp", "fsdp"), "prompts_on_host": (False, True),
             "lr_warmup": (False, True), "compile_failure": (None, "a probe failed"), "generator_steps": (1, 2)}
    arguments = [name for name, parameter in inspect.signature(resolve_switches).parameters.items()
                 if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = [name for name in arguments if name not in known]
    if unknown:
        raise RuntimeError(f"resolve_switches takes {', '.join(unknown)}, which bench/auto_choices.py does not vary: "
                           f"add the values that change auto's choice to cases(), so the tracking check covers them.")
    return {name: known[name] for name in arguments}


def auto_choices() -> list[AutoChoice]:
    """Every (precision, compile, cuda_graph, channels_last) that `auto` resolves to over all `cases()`, fp32 eager
    (the tracking check's reference) included; in the order of the precisions, most switches first."""
    grid = cases()
    found = set()
    for values in itertools.product(*grid.values()):
        case = dict(zip(grid, values))
        switches = resolve_switches("auto", "auto", "auto", **case)
        found.add(AutoChoice(case["precision"], *(getattr(switches, name) for name in SWITCHES)))
    order = {precision: index for index, precision in enumerate(grid["precision"])}
    return sorted(found, key=lambda choice: (order[choice.precision], [not on for on in choice[1:]]))
