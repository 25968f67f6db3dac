"""Record SiD's own outputs on tiny networks into `sid.safetensors` + `sid.json` (tests/test_reference_sid_dmd2.py).

SiD (https://github.com/mingyuanzhou/SiD) is not vendored: export a checkout outside this repository and point at it:

    mkdir /tmp/sid && git -C /path/to/SiD.git archive 01fbb13 | tar -x -C /tmp/sid
    python scripts/reference/sid.py /tmp/sid tests/fixtures/reference \
        --commit 01fbb13cf18411e5f70d187c8fb2559567e5ae1c

Everything runs on CPU in float32 through SiD's own code (`training/sid_loss.py`, `training/networks.py`, and the EMA
lines of `training/sid_training_loop.py`, executed from the file's text). Recorded:
- `sigma/generator`, `sigma/fake`: the noise levels `SID_EDMLoss.generator_loss` (tmax=800) and `SID_EDMLoss.__call__`
  hand to the score networks, 200k draws each, stored as 10001 order statistics of the sorted draws.
- per variant (`uncond`, `cond`: a tiny DDPM++ `EDMPrecond`, with 9 augment inputs as SiD's CIFAR-10 runs): teacher,
  fake-score and generator weights (float16-representable values, stored as float16, loaded as float32); one fake-score
  step and one generator step as `sid_training_loop.py` runs them (network modes, init_sigma 2.5, loss scalings):
  unit noise z, generated images, the draws (sigma and unit noise, replayed from the seed and checked bit for bit
  against what the networks received), the per-sample loss (the returned tensor summed over pixels) and the gradients.
- `ema/*`: the generator's EMA after each of 30 iterations, with cur_nimg advancing by batch_size after each update.
"""

from __future__ import annotations

import argparse
import copy
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

from fixture_helpers import compact_json, fill_parameters, flat_state  # Beside this script, on its sys.path.

NUM_DRAWS = 200_000  # Noise levels drawn per distribution.
NUM_QUANTILES = 10_001  # Order statistics kept of them: the empirical CDF to 1e-4, well inside KS <= 0.01.
RESOLUTION, CHANNELS, BATCH = 8, 3, 8
INIT_SIGMA = 2.5  # sid_train.py --init_sigma default.
ALPHA, TMAX = 1.2, 800  # sid_train.py defaults (run_sid.sh uses them for CIFAR-10 and ImageNet).
LOSS_SCALING, LOSS_SCALING_G = 1, 100  # training_loop defaults.
# DDPM++ as sid_train.py builds it (--arch ddpmpp), shrunk; augment_dim 9 as with SiD's default --augment; no dropout,
# so that the network modes SiD switches between do not change the outputs.
TINY_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                   channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.0)
VARIANTS = {"uncond": 0, "cond": 10}  # label_dim
EMA_SETTINGS = dict(batch_size=64, ema_halflife_kimg=0.05, ema_rampup_ratio=0.05)  # Ramp-up meets the cap at nimg 1000.
EMA_ITERATIONS = 30


def quantiles(draws: torch.Tensor) -> torch.Tensor:
    """NUM_QUANTILES evenly spaced order statistics of `draws`, both extremes included."""
    ordered = draws.flatten().sort().values
    index = torch.div(torch.arange(NUM_QUANTILES) * (ordered.numel() - 1), NUM_QUANTILES - 1, rounding_mode="floor")
    return ordered[index].contiguous()


class SigmaProbe:
    """A stand-in score network that records the sigma it is called with and returns its input."""

    def __init__(self):
        self.sigmas = []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.sigmas.append(sigma.detach().flatten().clone())
        return x


class Recording:
    """Calls a network and records each call's input `x` and `sigma`."""

    def __init__(self, net):
        self.net = net
        self.calls = []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append((x.detach().clone(), sigma.detach().flatten().clone()))
        return self.net(x, sigma, labels, augment_labels=augment_labels)


def record_sigma_distributions(loss_fn) -> dict[str, torch.Tensor]:
    images = torch.zeros([NUM_DRAWS, 1, 1, 1])
    true_probe, fake_probe = SigmaProbe(), SigmaProbe()
    torch.manual_seed(100)
    loss_fn.generator_loss(true_probe, fake_probe, images, labels=None, augment_pipe=None, alpha=ALPHA, tmax=TMAX)
    assert torch.equal(true_probe.sigmas[0], fake_probe.sigmas[0])
    fake_score_probe = SigmaProbe()
    torch.manual_seed(101)
    loss_fn(fake_score=fake_score_probe, images=images, labels=None, augment_pipe=None)
    return {"sigma/generator": quantiles(true_probe.sigmas[0]), "sigma/fake": quantiles(fake_score_probe.sigmas[0])}


def grad_or_zeros(param: torch.Tensor) -> torch.Tensor:
    """The parameter's gradient; zeros where backward did not reach it (map_augment without augment labels)."""
    return torch.zeros_like(param) if param.grad is None else param.grad


def record_variant(EDMPrecond, loss_fn, name: str, label_dim: int, seed: int) -> tuple[dict, dict]:
    init_kwargs = dict(img_resolution=RESOLUTION, img_channels=CHANNELS, label_dim=label_dim, **TINY_DDPMPP)
    rng = torch.Generator().manual_seed(seed)
    teacher = EDMPrecond(**init_kwargs)
    fill_parameters(teacher, rng)
    # As sid_training_loop.py: fake score and generator start as copies of the teacher; here they are perturbed
    # copies, so that the teacher and the fake score differ as they do after some training.
    fake, generator = copy.deepcopy(teacher), copy.deepcopy(teacher)
    fill_parameters(fake, rng, base=teacher, scale=0.1)
    fill_parameters(generator, rng, base=teacher, scale=0.1)
    teacher.eval().requires_grad_(False)

    tensors = {f"{name}/weights/{role}": flat_state(net)
               for role, net in (("teacher", teacher), ("fake", fake), ("generator", generator))}
    labels = (torch.eye(label_dim)[torch.randint(label_dim, [BATCH], generator=rng)] if label_dim
              else torch.zeros([BATCH, 0]))  # SiD's unconditional dataset yields [batch, 0] labels.
    if label_dim:
        tensors[f"{name}/labels"] = labels
    shape = [BATCH, CHANNELS, RESOLUTION, RESOLUTION]
    init_sigma = INIT_SIGMA * torch.ones(BATCH, 1, 1, 1)

    def generate(z_unit):
        return generator(INIT_SIGMA * z_unit, init_sigma, labels, augment_labels=torch.zeros(BATCH, 9))

    def replay(seed_loss, draws):
        """The loss's random numbers, redrawn from its seed in the order it draws them."""
        torch.manual_seed(seed_loss)
        return draws()

    # Fake-score update (sid_training_loop.py: fake score in training mode, generator in eval mode, no gradient).
    fake.train().requires_grad_(True)
    generator.eval().requires_grad_(False)
    torch.manual_seed(seed + 1)
    z_unit = torch.randn(shape)
    images = generate(z_unit)
    fake_rec = Recording(fake)
    torch.manual_seed(seed + 2)
    loss = loss_fn(fake_score=fake_rec, images=images, labels=labels, augment_pipe=None)
    assert not loss.isnan().any()
    loss.sum().mul(LOSS_SCALING / BATCH).backward()
    noise = replay(seed + 2, lambda: (torch.randn([BATCH, 1, 1, 1]), torch.randn(shape))[1])
    (x_t, sigma), = fake_rec.calls
    assert torch.equal(x_t, images + noise * sigma.reshape(-1, 1, 1, 1))
    tensors.update({f"{name}/fake_step/z": z_unit, f"{name}/fake_step/images": images.detach(),
                    f"{name}/fake_step/sigma": sigma, f"{name}/fake_step/noise": noise,
                    f"{name}/fake_step/loss": loss.detach().sum(dim=[1, 2, 3])})
    tensors[f"{name}/fake_step/grad_fake"] = torch.cat([grad_or_zeros(p).flatten() for p in fake.parameters()])
    fake.eval().requires_grad_(False)
    fake.zero_grad(set_to_none=True)

    # Generator update (generator in training mode; teacher and fake score in eval mode, gradients through inputs).
    generator.train().requires_grad_(True)
    torch.manual_seed(seed + 3)
    z_unit = torch.randn(shape)
    images = generate(z_unit)
    images.retain_grad()
    true_rec, fake_rec = Recording(teacher), Recording(fake)
    torch.manual_seed(seed + 4)
    loss = loss_fn.generator_loss(true_score=true_rec, fake_score=fake_rec, images=images, labels=labels,
                                  augment_pipe=None, alpha=ALPHA, tmax=TMAX)
    assert not loss.isnan().any()
    loss.sum().mul(LOSS_SCALING_G / BATCH).backward()
    noise = replay(seed + 4, lambda: (torch.rand([BATCH, 1, 1, 1]), torch.randn(shape))[1])
    (x_t, sigma), (x_t_fake, sigma_fake) = true_rec.calls[0], fake_rec.calls[0]
    assert torch.equal(x_t, x_t_fake) and torch.equal(sigma, sigma_fake)
    assert torch.equal(x_t, images.detach() + noise * sigma.reshape(-1, 1, 1, 1))
    tensors.update({f"{name}/generator_step/z": z_unit, f"{name}/generator_step/images": images.detach(),
                    f"{name}/generator_step/sigma": sigma, f"{name}/generator_step/noise": noise,
                    f"{name}/generator_step/loss": loss.detach().sum(dim=[1, 2, 3]),
                    f"{name}/generator_step/grad_images": images.grad.clone()})
    tensors[f"{name}/generator_step/grad_generator"] = torch.cat([grad_or_zeros(p).flatten()
                                                                  for p in generator.parameters()])
    params = dict(teacher.named_parameters())
    settings = dict(class_name="EDMPrecond", init_kwargs=init_kwargs,
                    state_dict=[[key, list(value.shape), key in params] for key, value in teacher.state_dict().items()],
                    batch=BATCH, init_sigma=INIT_SIGMA, alpha=ALPHA, tmax=TMAX, loss_scaling=LOSS_SCALING,
                    loss_scaling_G=LOSS_SCALING_G, seed=seed)
    return tensors, settings


def ema_block(loop_source: str) -> str:
    """The `# Update EMA.` lines of sid_training_loop.py, dedented, and a check that cur_nimg advances after them."""
    lines = loop_source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# Update EMA.")
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith("# Perform maintenance"))
    assert lines[end + 1].strip() == "cur_nimg += batch_size", lines[end + 1]
    return textwrap.dedent("\n".join(lines[start:end]))


def record_ema(loop_source: str) -> tuple[dict, dict]:
    block = ema_block(loop_source)
    rng = torch.Generator().manual_seed(7)
    G = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        for p in G.parameters():
            p.copy_(torch.randn(p.shape, generator=rng))
    G.requires_grad_(False)  # As at the EMA update, after G_ddp.eval().requires_grad_(False).
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    tensors = {f"ema/initial/{k}": v.clone() for k, v in G.state_dict().items()}
    scope = dict(G=G, G_ema=G_ema, cur_nimg=0, torch=torch, **EMA_SETTINGS)
    generator_steps, averages, betas, nimgs = [], [], [], []
    for _ in range(EMA_ITERATIONS):
        with torch.no_grad():  # The generator's update this iteration: a random step.
            for p in G.parameters():
                p.add_(torch.randn(p.shape, generator=rng))
        nimgs.append(scope["cur_nimg"])
        exec(block, scope)
        scope["cur_nimg"] += scope["batch_size"]
        betas.append(scope["ema_beta"])
        generator_steps.append(torch.cat([p.flatten() for p in G.parameters()]))
        averages.append(torch.cat([p.flatten() for p in G_ema.parameters()]))
    tensors.update({"ema/generator": torch.stack(generator_steps), "ema/average": torch.stack(averages),
                    "ema/beta": torch.tensor(betas, dtype=torch.float64)})
    settings = dict(EMA_SETTINGS, iterations=EMA_ITERATIONS, nimg_before_update=nimgs, module="Linear(4,3),Linear(3,2)",
                    source=block)
    return tensors, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="an exported SiD work tree (not inside this repository)")
    parser.add_argument("out", type=Path, help="folder for sid.safetensors and sid.json")
    parser.add_argument("--commit", required=True, help="the SiD commit the checkout was exported from")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    torch.set_num_threads(1)
    sys.path.insert(0, str(checkout))
    from training.networks import EDMPrecond  # noqa: E402  (SiD's code, from the checkout)
    from training.sid_loss import SID_EDMLoss  # noqa: E402

    loss_fn = SID_EDMLoss()  # sid_train.py: loss_kwargs class_name only, so the defaults P_mean -1.2, P_std 1.2.
    tensors = record_sigma_distributions(loss_fn)
    variants = {}
    for index, (name, label_dim) in enumerate(VARIANTS.items()):
        variant_tensors, variants[name] = record_variant(EDMPrecond, loss_fn, name, label_dim, seed=10 * (index + 1))
        tensors.update(variant_tensors)
    ema_tensors, ema_settings = record_ema((checkout / "training" / "sid_training_loop.py").read_text())
    tensors.update(ema_tensors)

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / "sid.safetensors"))
    meta = dict(
        note="Written by scripts/reference/sid.py from SiD's own code; read by tests/test_reference_sid_dmd2.py.",
        repository="https://github.com/mingyuanzhou/SiD", commit=args.commit,
        command=f"python scripts/reference/sid.py <SiD checkout> {args.out} --commit {args.commit}",
        torch_version=torch.__version__,
        sigma=dict(num_draws=NUM_DRAWS, num_quantiles=NUM_QUANTILES, tmax=TMAX,
                   generator="SID_EDMLoss.generator_loss(tmax=800), sigma handed to the score networks",
                   fake="SID_EDMLoss.__call__ (P_mean -1.2, P_std 1.2), sigma handed to the fake score"),
        variants=variants, ema=ema_settings,
        conventions=dict(z="unit normal; SiD's z is init_sigma * z", loss="per sample: the returned tensor summed "
                         "over pixels", grad_images="of loss.sum() * loss_scaling_G / batch w.r.t. the generated "
                         "images", weights="the state dict's values flattened in order (layout in state_dict), float16 "
                         "in the file, exact float32 values", grad_fake="of loss.sum() * loss_scaling / batch, the "
                         "parameters' gradients flattened in order (the state_dict entries marked true)"))
    (args.out / "sid.json").write_text(compact_json(meta))
    print(f"wrote {args.out / 'sid.safetensors'} ({(args.out / 'sid.safetensors').stat().st_size} bytes) and sid.json")


if __name__ == "__main__":
    main()
