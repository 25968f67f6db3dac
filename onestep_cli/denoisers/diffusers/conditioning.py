"""Text conditioning of a diffusers teacher as one batched value that can be sliced, joined, moved and saved.

Each field is a tensor whose first dimension is the batch, or None when the teacher does not use it:

- `embeds`    `[batch, tokens, dim]` text-encoder hidden states (SD: CLIP; SDXL: both CLIPs concatenated; PixArt: T5).
- `mask`      `[batch, tokens]` attention mask of `embeds`, 1 = keep (PixArt's T5 tokens; None for CLIP teachers).
- `pooled`    `[batch, dim]` pooled text embedding (SDXL's second text encoder; SD3).
- `time_ids`  `[batch, 6]` SDXL micro-conditioning: original size, crop top-left, target size, in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

FIELDS = ("embeds", "mask", "pooled", "time_ids")


@dataclass
class Conditioning:
    """A batch of text conditions; every present field has the same first dimension."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __post_init__(self):
        sizes = {name: value.shape[0] for name, value in self.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning fields disagree on the batch size: {sizes}; give every field the same "
                             "first dimension.")

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of the fields that are present."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index) -> Conditioning:
        """Rows `index` (an int keeps a batch dimension of 1; slices, index tensors and boolean masks as in torch)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(self, **{name: value[index] for name, value in self.items()})

    def map(self, function) -> Conditioning:
        """Apply `function` to every present field."""
        return replace(self, **{name: function(value) for name, value in self.items()})

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to `device`; cast floating-point fields (not the mask) to `dtype`."""
        def move(value: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and value.is_floating_point() else None
            return value.to(device=device, dtype=cast)
        return replace(self, embeds=move(self.embeds), pooled=_maybe(move, self.pooled),
                       time_ids=_maybe(lambda v: v.to(device=device), self.time_ids),
                       mask=_maybe(lambda v: v.to(device=device), self.mask))

    def expand(self, batch: int) -> Conditioning:
        """Repeat a single condition `batch` times (a batch that already has `batch` rows is returned unchanged)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a Conditioning of batch {len(self)} to {batch}; only a batch of 1 "
                             "expands.")
        return self.map(lambda v: v.expand(batch, *v.shape[1:]))

    def zeros_like(self) -> Conditioning:
        """The all-zero text condition (DMD2's SDXL null): embeddings and pooled zeroed; mask and time ids kept, since
        they describe token positions and image size rather than the prompt."""
        return replace(self, embeds=torch.zeros_like(self.embeds), pooled=_maybe(torch.zeros_like, self.pooled))

    def where(self, keep: torch.Tensor, other: Conditioning) -> Conditioning:
        """Row-wise choice: row i from `self` where `keep[i]`, else from `other` (a batch of 1 is expanded).

        Used for prompt dropout: `cond.where(torch.rand(b) >= p, null)`.
        """
        other = other.expand(len(self)).to(self.embeds.device)
        chosen = {}
        for name, value in self.items():
            alternative = getattr(other, name)
            if alternative is None:
                raise ValueError(f"cannot mix conditions: field {name!r} is missing from the other condition.")
            mask = keep.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
            chosen[name] = torch.where(mask, value, alternative.to(value.dtype))
        return replace(self, **chosen)

    @staticmethod
    def cat(conditions: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch; every condition must have the same fields present."""
        present = [tuple(name for name, _ in c.items()) for c in conditions]
        if len(set(present)) != 1:
            raise ValueError(f"cannot concatenate conditions with different fields: {sorted(set(present))}.")
        return Conditioning(**{name: torch.cat([getattr(c, name) for c in conditions]) for name in present[0]})

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Present fields as `{prefix + name: tensor}` (contiguous, for safetensors)."""
        return {prefix + name: value.contiguous() for name, value in self.items()}

    @staticmethod
    def from_state_dict(tensors: dict[str, torch.Tensor], prefix: str = "") -> Conditioning:
        """Inverse of `state_dict`."""
        values = {name: tensors.get(prefix + name) for name in FIELDS}
        if values["embeds"] is None:
            raise ValueError(f"no {prefix}embeds tensor found; the file does not hold a text condition.")
        return Conditioning(**values)


def _maybe(function, value):
    return None if value is None else function(value)
