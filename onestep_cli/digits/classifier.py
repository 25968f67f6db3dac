"""A small CNN that classifies digits; its penultimate activations are the feature space of `fd_digits`.

Saved as `model.safetensors` + `config.json` (`{"format": "onestep-digits-classifier", "format_version": 1,
"init_kwargs": {...}, "training": {...}}`); the shipped one is in `onestep_cli/assets/digits_classifier/`, trained by
`scripts/train_digits_classifier.py` on a fixed split of sklearn's digits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, MissingFileError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "onestep-digits-classifier"
FORMAT_VERSION = 1
SHIPPED_CLASSIFIER = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier"


class DigitsClassifier(nn.Module):
    """Two conv stages (each two 3x3 convs and a 2x2 max-pool), then a `feature_dim` layer and the class logits."""

    def __init__(
        self,
        resolution: int = 8,        # Input resolution, pixels (a multiple of 4).
        channels: int = 32,         # Channels of the first stage; the second has twice as many.
        feature_dim: int = 64,      # Width of the penultimate layer, the fd_digits feature space.
        num_classes: int = 10,      # Output classes.
        dropout: float = 0.3,       # Dropout before the last two layers while training.
    ):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"DigitsClassifier resolution {resolution} must be a multiple of 4 (two 2x2 pools).")
        self.init_kwargs = dict(resolution=resolution, channels=channels, feature_dim=feature_dim,
                                num_classes=num_classes, dropout=dropout)
        self.resolution = resolution
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.features_layer = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * c * (resolution // 4) ** 2, feature_dim),
                                             nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations `[N, feature_dim]` of images `[N, 1, resolution, resolution]` in [-1, 1]."""
        if images.shape[1:] != (1, self.resolution, self.resolution):
            raise ValueError(f"DigitsClassifier expects images of shape [N, 1, {self.resolution}, {self.resolution}], "
                             f"got {list(images.shape)}.")
        return self.features_layer(self.conv(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits `[N, num_classes]`."""
        return self.head(self.features(images))


def save_classifier(model: DigitsClassifier, out_dir: str | os.PathLike, training: dict | None = None) -> Path:
    """Write weights and config (with an optional record of how it was trained) to `out_dir`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, init_kwargs=model.init_kwargs, training=training or {})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_classifier_config(weights_dir: str | os.PathLike = SHIPPED_CLASSIFIER) -> dict:
    path = Path(weights_dir) / CONFIG_NAME
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; pass a folder written by save_classifier "
                               f"(scripts/train_digits_classifier.py).")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path} is not a version-{FORMAT_VERSION} {FORMAT} config; retrain or re-export it.")
    return config


def load_classifier(weights_dir: str | os.PathLike = SHIPPED_CLASSIFIER) -> DigitsClassifier:
    """The classifier saved in `weights_dir` (the shipped one by default), in eval mode on the CPU, frozen."""
    from safetensors.torch import load_file

    config = read_classifier_config(weights_dir)
    model = DigitsClassifier(**config["init_kwargs"])
    model.load_state_dict(load_file(Path(weights_dir) / WEIGHTS_NAME), strict=True)
    return model.eval().requires_grad_(False)
