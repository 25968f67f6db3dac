"""What the recording scripts beside this file share: weights for the tiny networks and the fixtures' JSON layout."""

from __future__ import annotations

import json
import re

import torch


def fill_parameters(net: torch.nn.Module, generator: torch.Generator, base: torch.nn.Module | None = None,
                    scale: float = 1.0) -> None:
    """Random float16-representable parameters of sane scale; with `base`, base's plus `scale` times such noise."""
    base_params = dict(base.named_parameters()) if base is not None else {}
    with torch.no_grad():
        for name, param in net.named_parameters():
            values = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                values *= (1 / param[0].numel()) ** 0.5  # unit-variance outputs for unit-variance inputs
            elif "norm" in name and name.endswith("weight") and base is None:
                values = 1 + 0.2 * values
            else:
                values *= 0.2
            if base is not None:
                values = base_params[name] + scale * values
            param.copy_(values.half().float())


def flat_state(net: torch.nn.Module) -> torch.Tensor:
    """The state dict's values flattened in order, as float16 (exact: every value was chosen float16-representable)."""
    flat = torch.cat([tensor.flatten() for tensor in net.state_dict().values()])
    assert torch.equal(flat.half().float(), flat)
    return flat.half()


def compact_json(data) -> str:
    """Indented JSON with short lists on one line."""
    text = json.dumps(data, indent=1)
    short_list = re.compile(r"\[(?:[^\[\]{}]|\[[^\[\]{}\n]*\])*\]")
    for _ in range(2):
        text = short_list.sub(lambda m: json.dumps(json.loads(m.group())) if len(m.group()) < 400 else m.group(),
                              text)
    return text + "\n"
