"""Record NVlabs/edm's `AugmentPipe` on a few photographs, with the per-image parameters it drew, for
`tests/test_reference_augment.py`.

Usage (EDM is not vendored; point at a checkout of https://github.com/NVlabs/edm outside this repository):

    python scripts/reference/edm_augment.py /path/to/edm tests/fixtures/reference/edm_augment.safetensors

The images are four 32x32 RGB crops of scikit-learn's two bundled sample photographs (area-downsampled, in [-1, 1]),
so that content reaches the borders, where padding matters. Each run (`RUNS`) builds EDM's
`training.augment.AugmentPipe` with SiD's CIFAR-10 multipliers, or with one of its ops alone, seeds torch and calls
it on the CPU in float32. Meanwhile torch.rand, torch.randn and torch.randint are wrapped to keep every draw in call
order; the per-image parameters are read off those draws the way `AugmentPipe.__call__` uses them (an op's value
where its chance draw fell below its probability, else 0), and checked: the labels rebuilt from them must equal the
labels EDM returned, bit for bit. Written: the inputs, and per run the parameters, EDM's output images and its labels
(only the columns of the ops enabled, listed in the JSON written beside the fixture with the EDM commit, the
settings and this command).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

SID_CIFAR10 = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # SiD's `augment 0.12`.
# Op -> EDM label columns (9-label layout of SID_CIFAR10), in the order AugmentPipe appends them.
LABEL_COLUMNS = dict(xflip=[0], yflip=[1], scale=[2], rotate_frac=[3, 4], aniso=[5, 6], translate_frac=[7, 8])
# Name -> (p, multipliers, torch seed). Each op alone at p=1 fires on every image; all together at p=0.5 and p=1.
# Seeds (of 0-299) that make the fixture hold EDM's padding too: alone, each op's seed is where EDM's margin falls
# furthest short of what its filters read (the output then differs by 6e-5 from padding by the most EDM allows);
# together, where that shortfall and the margin's being shared by the batch both show (an image augmented in a batch
# of its own, padded by its own margin, would differ by 8e-5 and 1.5e-4).
SEEDS = dict(xflip=0, yflip=1, scale=85, rotate_frac=48, aniso=110, translate_frac=5)
RUNS = {
    **{op: (1.0, {op: SID_CIFAR10[op]}, SEEDS[op]) for op in SID_CIFAR10},
    "all_p0.5": (0.5, SID_CIFAR10, 241),
    "all_p1": (1.0, SID_CIFAR10, 36),
}
CROPS = [("china.jpg", 0, 40), ("china.jpg", 160, 300), ("flower.jpg", 100, 150), ("flower.jpg", 150, 384)]
CROP_SIZE, RESOLUTION = 256, 32  # Crop side in the photograph's pixels, and the side it is averaged down to.


def photographs() -> torch.Tensor:
    """`[4, 3, 32, 32]` float32 in [-1, 1]: the CROPS (top, left) of scikit-learn's sample images, area-averaged."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    by_name = {Path(name).name: image for name, image in zip(sample.filenames, sample.images)}
    crops = [torch.from_numpy(by_name[name][top:top + CROP_SIZE, left:left + CROP_SIZE].copy())
             for name, top, left in CROPS]
    images = torch.stack(crops).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
    return F.adaptive_avg_pool2d(images, RESOLUTION).contiguous()


@contextmanager
def recorded_draws():
    """Keep the result of every torch.rand, torch.randn and torch.randint call made inside, in call order."""
    draws = []

    def recording(function):
        def wrapper(*args, **kwargs):
            draws.append(function(*args, **kwargs))
            return draws[-1]
        return wrapper

    with mock.patch.object(torch, "rand", recording(torch.rand)), \
            mock.patch.object(torch, "randn", recording(torch.randn)), \
            mock.patch.object(torch, "randint", recording(torch.randint)):
        yield draws


def read_parameters(pipe, draws: list[torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """The per-image parameters (onestep's `Augmentation` fields) from `pipe`'s draws, in the order of its
    `__call__` at the recorded commit; ops it does not enable stay 0."""
    draws = iter(draws)
    parameters = {name: torch.zeros(batch) for name in ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle")}
    parameters["translate"] = torch.zeros(batch, 2)

    def chosen(value: torch.Tensor, probability: float) -> torch.Tensor:
        applied = next(draws).reshape(-1, *[1] * (value.ndim - 1)) < probability
        return torch.where(applied, value, torch.zeros_like(value))

    angle = lambda draw, fraction: (draw.reshape(-1) * 2 - 1) * (np.pi * fraction)
    if pipe.xflip > 0:
        parameters["xflip"] = chosen(next(draws).reshape(-1), pipe.xflip * pipe.p).to(torch.float32)
    if pipe.yflip > 0:
        parameters["yflip"] = chosen(next(draws).reshape(-1), pipe.yflip * pipe.p).to(torch.float32)
    if pipe.scale > 0:
        parameters["scale"] = chosen(next(draws), pipe.scale * pipe.p)
    if pipe.rotate_frac > 0:
        parameters["rotate"] = chosen(angle(next(draws), pipe.rotate_frac_max), pipe.rotate_frac * pipe.p)
    if pipe.aniso > 0:
        stretch, axis = next(draws), angle(next(draws), 1)
        parameters["aniso"] = chosen(stretch, pipe.aniso * pipe.p)
        parameters["aniso_angle"] = chosen(axis, pipe.aniso_rotate_prob)
    if pipe.translate_frac > 0:
        shift = next(draws)  # [2, N]
        # One chance for both axes.
        parameters["translate"] = chosen(shift.t().contiguous(), pipe.translate_frac * pipe.p)
    left = list(draws)
    if left:
        raise RuntimeError(f"AugmentPipe drew {len(left)} more random tensors than read_parameters reads; this "
                           "EDM commit's __call__ differs from the one read_parameters follows. Update it.")
    return parameters


def labels_from(parameters: dict[str, torch.Tensor], ops) -> torch.Tensor:
    """EDM's labels of the enabled `ops`, rebuilt from the parameters (checks read_parameters)."""
    p = parameters
    columns = dict(xflip=[p["xflip"]], yflip=[p["yflip"]], scale=[p["scale"]],
                   rotate_frac=[p["rotate"].cos() - 1, p["rotate"].sin()],
                   aniso=[p["aniso"] * p["aniso_angle"].cos(), p["aniso"] * p["aniso_angle"].sin()],
                   translate_frac=[p["translate"][:, 0], p["translate"][:, 1]])
    return torch.stack([column for op in SID_CIFAR10 if op in ops for column in columns[op]], dim=1)


def edm_commit(checkout: Path, given: str | None) -> str:
    if given:
        return given
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{checkout} is not a git checkout, so its EDM commit is unknown; pass --commit SHA.")
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("edm", type=Path, help="a checkout of NVlabs/edm (outside this repository)")
    parser.add_argument("out", type=Path, help="the .safetensors fixture to write (a .json is written beside it)")
    parser.add_argument("--commit", help="EDM's commit, where the checkout is no git work tree")
    args = parser.parse_args()
    from safetensors.torch import save_file

    sys.path.insert(0, str(args.edm.resolve()))
    from training.augment import AugmentPipe

    torch.set_num_threads(1)
    images = photographs()
    tensors, runs = {"images": images}, {}
    for name, (p, multipliers, seed) in RUNS.items():
        pipe = AugmentPipe(p=p, **multipliers)
        torch.manual_seed(seed)
        with recorded_draws() as draws:
            output, labels = pipe(images.clone())
        parameters = read_parameters(pipe, draws, len(images))
        if not torch.equal(labels_from(parameters, multipliers), labels):
            raise RuntimeError(f"run {name}: labels rebuilt from the read parameters differ from EDM's; "
                               "read_parameters no longer follows AugmentPipe's draws.")
        tensors.update({f"{name}.{field}": value for field, value in parameters.items()})
        tensors.update({f"{name}.output": output.contiguous(), f"{name}.labels": labels.contiguous()})
        runs[name] = dict(p=p, multipliers=multipliers, seed=seed,
                          label_columns=[c for op in SID_CIFAR10 if op in multipliers for c in LABEL_COLUMNS[op]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out))
    record = dict(
        edm_repository="https://github.com/NVlabs/edm", edm_commit=edm_commit(args.edm, args.commit),
        edm_code="training/augment.py AugmentPipe, CPU, float32, one thread", torch=torch.__version__,
        command=f"python scripts/reference/edm_augment.py /path/to/edm {args.out}",
        images=dict(source="sklearn.datasets.load_sample_images", crops_top_left=CROPS, crop_size=CROP_SIZE,
                    resolution=RESOLUTION, range=[-1, 1]),
        sid_cifar10_multipliers=SID_CIFAR10, runs=runs,
        parameters="read off the recorded torch.rand/randn/randint draws; labels rebuilt from them equal EDM's")
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
