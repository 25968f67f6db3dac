"""Train the shipped digits classifier (the feature network of fd_digits and the judge of class_accuracy).

Trains on 75% of sklearn's 1797 digits (split seed 0, `onestep_cli.digits.data.split_indices`), reports accuracy on the
other 25%, and saves weights, config (with the test accuracy) and a per-epoch log. Augmentation: random shifts of up
to one pixel, so that the judge does not depend on exact pixel placement. CPU, about a minute:

    PYTHONPATH=. python scripts/train_digits_classifier.py --out onestep_cli/assets/digits_classifier \
        --log docs/logs/digits_classifier_train.jsonl

The 32x32 judge of prompt_accuracy (a few CPU minutes):

    PYTHONPATH=. python scripts/train_digits_classifier.py --resolution 32 --channels 16 --max-shift 4 \
        --out onestep_cli/assets/digits_classifier32 --log docs/logs/digits_classifier32_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from onestep_cli.digits.classifier import DigitsClassifier, save_classifier
from onestep_cli.digits.data import load_digits_images, split_indices


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Output folder for model.safetensors + config.json.")
    p.add_argument("--log", type=Path, required=True, help="Per-epoch JSONL log.")
    p.add_argument("--resolution", type=int, default=8, help="Image resolution, pixels.")
    p.add_argument("--channels", type=int, default=32, help="Channels of the first conv stage (the second has twice "
                   "as many).")
    p.add_argument("--epochs", type=int, default=60, help="Passes over the training split.")
    p.add_argument("--batch", type=int, default=64, help="Images per step.")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to zero).")
    p.add_argument("--max-shift", type=int, default=1, help="Largest random shift of the augmentation, pixels.")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialisation, batches and augmentation.")
    return p.parse_args(argv)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y, filling with the background value -1."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dx, dy = (torch.randint(2 * max_shift + 1, (2, n), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_images(args.resolution)
    train_idx, test_idx = split_indices(len(labels), test_fraction=0.25, seed=0)
    x_train, y_train, x_test, y_test = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]

    model = DigitsClassifier(resolution=args.resolution, channels=args.channels)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(y_train) // args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps_per_epoch)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with args.log.open("w") as log:
        log.write(json.dumps({"options": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                              "num_train": len(y_train), "num_test": len(y_test),
                              "num_params": sum(p.numel() for p in model.parameters())}) + "\n")
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(len(y_train), generator=gen)
            total = 0.0
            for i in range(0, len(order), args.batch):
                idx = order[i:i + args.batch]
                loss = F.cross_entropy(model(random_shift(x_train[idx], args.max_shift, gen)), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss) * len(idx)
            record = {"epoch": epoch + 1, "train_loss": total / len(y_train),
                      "train_accuracy": accuracy(model, x_train, y_train),
                      "test_accuracy": accuracy(model, x_test, y_test), "elapsed_s": time.time() - start}
            log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    training = {"data": "sklearn load_digits, bilinear to the resolution, [-1, 1]",
                "split": "onestep_cli.digits.data.split_indices(1797, test_fraction=0.25, seed=0)",
                "num_train": len(y_train), "num_test": len(y_test), "epochs": args.epochs,
                "test_accuracy": record["test_accuracy"], "train_accuracy": record["train_accuracy"],
                "script": "scripts/train_digits_classifier.py", "seed": args.seed}
    save_classifier(model, args.out, training)
    print(json.dumps({"saved": str(args.out), **training}))


if __name__ == "__main__":
    main()
