"""Record DMD2's own outputs on tiny networks into dmd2.safetensors + dmd2.json (tests/test_reference_sid_dmd2.py).

DMD2 (https://github.com/tianweiy/DMD2) is not vendored: export a checkout outside this repository and point at it:

    mkdir /tmp/dmd2 && git -C /path/to/DMD2.git archive 8d8fa55 | tar -x -C /tmp/dmd2
    python scripts/reference/dmd2.py /tmp/dmd2 tests/fixtures/reference \
        --commit 8d8fa55633d47cfb81bbc7a892e7248f9518763f

Everything runs on CPU in float32 through DMD2's own code. The settings are those of its ImageNet-64 recipe without
the GAN term (`experiments/imagenet/imagenet_lr2e-6_scratch.sh`, FID 2.61), parsed by `train_edm.parse_args` (its
imports of wandb, lmdb and plotting helpers are replaced by empty modules). `EDMGuidance.__init__` and
`EDMUniModel.__init__` run as written, with the teacher snapshot they unpickle from a URL replaced by a tiny in-memory
ADM teacher (`dnnlib.util.open_url`, `pickle.load` and `get_edm_network` patched in `edm_guidance`). Recorded:
- `sigma/grid`: the guidance's `karras_sigmas` buffer; `sigma/generator_counts`, `sigma/fake_counts`: how often each
  level was handed to the networks in 200k draws of `compute_distribution_matching_loss` and `compute_loss_fake`.
- `dm/*`, `fake/*`: one iteration of `train_one_step` without the GAN term: the generator turn of `EDMUniModel`
  (loss_dm, its gradients w.r.t. the generated images and the generator) and the guidance turn on the same images
  (loss_fake_mean, its gradients w.r.t. the fake score), with the draws replayed from the seed and checked bit for
  bit against what the networks received; the weights (float16-representable, stored as float16).
- `warmup/*`: the learning-rate factor of each iteration for the fake score and the generator, from diffusers'
  `get_scheduler("constant_with_warmup")` wrapped in accelerate's `AcceleratedScheduler` for 1 and for 7 processes.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from fixture_helpers import compact_json, fill_parameters, flat_state  # Beside this script, on its sys.path.

RECIPE = "experiments/imagenet/imagenet_lr2e-6_scratch.sh"
NUM_DRAWS = 200_000  # Noise levels drawn per distribution.
RESOLUTION, CHANNELS, BATCH, LABEL_DIM = 8, 3, 8, 10
# DMD2's ImageNet network (edm_network.get_imagenet_edm_config: ADM, dropout 0, no augment inputs), shrunk. ADM's
# attention needs 64 channels a head, so this width has none.
TINY_ADM = dict(model_type="DhariwalUNet", model_channels=8, channel_mult=[1, 1], channel_mult_emb=2, num_blocks=1,
                attn_resolutions=[], augment_dim=0, dropout=0.0, label_dropout=0)
WARMUP_ITERATIONS = 600
PROCESS_COUNTS = (1, 7)  # One process, and the recipe's 7 GPUs (checked against its torchrun line).


def recipe_arguments(checkout: Path) -> tuple[list[str], int]:
    """The train_edm.py arguments of the recipe script, and its --nproc_per_node."""
    text = (checkout / RECIPE).read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "torchrun" in line)
    tokens = shlex.split(line)
    script = next(i for i, token in enumerate(tokens) if token.endswith("train_edm.py"))
    return tokens[script + 1:], int(tokens[tokens.index("--nproc_per_node") + 1])


def import_train_edm(checkout: Path):
    """main.edm.train_edm, with the modules it imports only for logging and data loading stubbed out."""
    import accelerate  # noqa: F401  (imported before the wandb stub, which their availability checks reject)
    import diffusers.optimization  # noqa: F401
    for name, attributes in {"wandb": [], "main.utils": ["prepare_images_for_saving", "draw_valued_array", "cycle",
                                                         "draw_probability_histogram"],
                             "main.data.lmdb_dataset": ["LMDBDataset"]}.items():
        module = types.ModuleType(name)
        for attribute in attributes:
            setattr(module, attribute, None)
        sys.modules[name] = module
    sys.path.insert(0, str(checkout))
    import main.edm.train_edm as train_edm  # noqa: E402  (DMD2's code, from the checkout)
    return train_edm


def flat_grad(net: torch.nn.Module) -> torch.Tensor:
    """The parameters' gradients flattened in order (zeros where backward did not reach)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in net.parameters()])


class Probe(torch.nn.Module):
    """Stands in for a network: records the sigma it is called with and returns its input plus one."""

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def forward(self, x, sigma, labels=None):
        self.sigmas.append(sigma.detach().flatten().clone())
        return x + 1


class Recording(torch.nn.Module):
    """Calls a network and records each call's inputs and output (the output keeps its gradient)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x, sigma, labels=None, **kwargs):
        out = self.net(x, sigma, labels, **kwargs)
        if out.requires_grad:
            out.retain_grad()
        self.calls.append((x.detach().clone(), sigma.detach().flatten().clone(), out))
        return out


def seeded(method, seed: int):
    """`method` with torch's global generator seeded just before it runs (its draws are then replayable)."""
    def call(*args, **kwargs):
        torch.manual_seed(seed)
        return method(*args, **kwargs)
    return call


def build_model(train_edm, args, network_class, teacher_kwargs: dict, teacher: torch.nn.Module):
    """DMD2's EDMUniModel(args) as its __init__ builds it, the unpickled teacher being `teacher`."""
    import main.edm.edm_guidance as edm_guidance  # noqa: E402

    edm_guidance.dnnlib.util.open_url = lambda url, *a, **k: contextlib.nullcontext(None)
    edm_guidance.pickle = types.SimpleNamespace(load=lambda file: {"ema": teacher})
    edm_guidance.get_edm_network = lambda args: network_class(**teacher_kwargs)
    return train_edm.EDMUniModel(args, accelerator=None)


def record_sigma_distributions(guidance) -> dict[str, torch.Tensor]:
    real, fake = guidance.real_unet, guidance.fake_unet
    latents = torch.zeros([NUM_DRAWS, 1, 1, 1])
    guidance.real_unet, guidance.fake_unet = Probe(), Probe()
    torch.manual_seed(100)
    guidance.compute_distribution_matching_loss(latents, None)
    generator_sigma = guidance.real_unet.sigmas[0]
    assert torch.equal(generator_sigma, guidance.fake_unet.sigmas[0])
    guidance.fake_unet = Probe()
    torch.manual_seed(101)
    guidance.compute_loss_fake(latents, None)
    fake_sigma = guidance.fake_unet.sigmas[0]
    guidance.real_unet, guidance.fake_unet = real, fake

    grid = guidance.karras_sigmas.clone()
    out = {"sigma/grid": grid}
    for name, sigma in (("generator", generator_sigma), ("fake", fake_sigma)):
        index = torch.searchsorted(grid, sigma)
        assert torch.equal(grid[index], sigma)  # every draw is a grid level
        out[f"sigma/{name}_counts"] = torch.bincount(index, minlength=grid.numel()).to(torch.int32)
    return out


def record_iteration(model, args, teacher_kwargs: dict, seed: int) -> tuple[dict, dict]:
    """One train_one_step of DMD2 without the GAN term, generator turn then guidance turn."""
    guidance = model.guidance_model
    real, fake, generator = guidance.real_unet, guidance.fake_unet, model.feedforward_model
    rng = torch.Generator().manual_seed(seed)
    # EDMUniModel starts fake score and generator as copies of the teacher; here they are perturbed copies, so that
    # teacher, fake score and generator differ as they do after some training.
    fill_parameters(fake, rng, base=real, scale=0.1)
    fill_parameters(generator, rng, base=real, scale=0.1)
    tensors = {f"weights/{role}": flat_state(net) for role, net in (("teacher", real), ("fake", fake),
                                                                    ("generator", generator))}
    labels = torch.eye(LABEL_DIM)[torch.randint(LABEL_DIM, [BATCH], generator=rng)]
    shape = [BATCH, CHANNELS, RESOLUTION, RESOLUTION]
    torch.manual_seed(seed + 1)
    z_unit = torch.randn(shape)
    scaled_noise = z_unit * args.conditioning_sigma  # train_one_step: randn(...) * conditioning_sigma
    timestep_sigma = torch.ones(BATCH) * args.conditioning_sigma

    model.train()  # train_one_step
    generator_rec, real_rec, fake_rec = Recording(generator), Recording(real), Recording(fake)
    model.feedforward_model, guidance.real_unet, guidance.fake_unet = generator_rec, real_rec, fake_rec
    guidance.compute_distribution_matching_loss = seeded(guidance.compute_distribution_matching_loss, seed + 2)
    guidance.compute_loss_fake = seeded(guidance.compute_loss_fake, seed + 3)

    loss_dict, log_dict = model(scaled_noise, timestep_sigma, labels, compute_generator_gradient=True,
                                generator_turn=True, guidance_turn=False)
    loss_dict["loss_dm"].backward()  # generator_loss = loss_dm (no GAN term); accelerator.backward
    (_, _, images), = generator_rec.calls
    torch.manual_seed(seed + 2)
    timesteps = torch.randint(guidance.min_step, min(guidance.max_step + 1, guidance.num_train_timesteps),
                              [BATCH, 1, 1, 1], dtype=torch.long)
    noise = torch.randn(shape)
    (x_t, sigma, _), (x_t_fake, sigma_fake, _) = real_rec.calls[0], fake_rec.calls[0]
    assert torch.equal(x_t, x_t_fake) and torch.equal(sigma, sigma_fake)
    assert torch.equal(sigma, guidance.karras_sigmas[timesteps].flatten())
    assert torch.equal(x_t, images.detach() + sigma.reshape(-1, 1, 1, 1) * noise)
    tensors.update({"z": z_unit, "labels": labels, "dm/images": images.detach(), "dm/sigma": sigma,
                    "dm/noise": noise, "dm/timesteps": timesteps.flatten().to(torch.int32),
                    "dm/loss_dm": loss_dict["loss_dm"].detach().reshape(1),
                    "dm/grad_images": images.grad.clone(), "dm/grad_generator": flat_grad(generator)})
    generator.zero_grad(set_to_none=True)

    loss_dict, _ = model(scaled_noise, timestep_sigma, labels, compute_generator_gradient=False,
                         generator_turn=False, guidance_turn=True, guidance_data_dict=log_dict["guidance_data_dict"])
    loss_dict["loss_fake_mean"].backward()
    torch.manual_seed(seed + 3)
    noise = torch.randn(shape)
    timesteps = torch.randint(0, guidance.num_train_timesteps, [BATCH, 1, 1, 1], dtype=torch.long)
    (x_t, sigma, _), = fake_rec.calls[1:]
    assert torch.equal(sigma, guidance.karras_sigmas[timesteps].flatten())
    assert torch.equal(x_t, images.detach() + sigma.reshape(-1, 1, 1, 1) * noise)
    assert all(p.grad is None for p in real.parameters())
    tensors.update({"fake/sigma": sigma, "fake/noise": noise, "fake/timesteps": timesteps.flatten().to(torch.int32),
                    "fake/loss_fake_mean": loss_dict["loss_fake_mean"].detach().reshape(1),
                    "fake/grad_fake": flat_grad(fake)})
    params = dict(real.named_parameters())
    settings = dict(class_name="EDMPrecond", init_kwargs=teacher_kwargs,
                    state_dict=[[key, list(value.shape), key in params] for key, value in real.state_dict().items()],
                    batch=BATCH, conditioning_sigma=args.conditioning_sigma, seed=seed,
                    modes="train (train_one_step calls model.train()); dropout 0")
    return tensors, settings


def record_warmup(train_edm, args, num_processes: int) -> dict[str, torch.Tensor]:
    """The lr factor each iteration's fake-score and generator updates use, stepping the schedulers as
    train_one_step does (both once per iteration, after the updates) through accelerate's AcceleratedScheduler."""
    import accelerate.scheduler

    accelerate.scheduler.AcceleratorState = lambda: types.SimpleNamespace(num_processes=num_processes)
    schedulers, optimizers = {}, {}
    for name in ("guidance", "generator"):
        optimizers[name] = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = train_edm.get_scheduler("constant_with_warmup", optimizer=optimizers[name],
                                           num_warmup_steps=args.warmup_step, num_training_steps=args.train_iters)
        schedulers[name] = accelerate.scheduler.AcceleratedScheduler(
            schedule, [types.SimpleNamespace(step_was_skipped=False)], step_with_optimizer=True, split_batches=False)
    factors = {"guidance": [], "generator": []}
    for _ in range(WARMUP_ITERATIONS):
        for name in ("generator", "guidance"):  # train_one_step's order; the generator updates every 5th iteration
            factors[name].append(optimizers[name].param_groups[0]["lr"])
            optimizers[name].step()  # no gradient: changes nothing, but keeps torch's step-order check quiet
            schedulers[name].step()
    return {f"warmup/{name}_p{num_processes}": torch.tensor(values, dtype=torch.float64)
            for name, values in factors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="an exported DMD2 work tree (not inside this repository)")
    parser.add_argument("out", type=Path, help="folder for dmd2.safetensors and dmd2.json")
    parser.add_argument("--commit", required=True, help="the DMD2 commit the checkout was exported from")
    options = parser.parse_args()
    checkout = options.checkout.resolve()
    torch.set_num_threads(1)
    train_edm = import_train_edm(checkout)
    recipe, nproc = recipe_arguments(checkout)
    assert nproc in PROCESS_COUNTS, nproc
    sys.argv = ["train_edm.py", *recipe]
    args = train_edm.parse_args()
    recipe_settings = {key: getattr(args, key) for key in (
        "min_step_percent", "max_step_percent", "num_train_timesteps", "sigma_min", "sigma_max", "rho", "sigma_data",
        "conditioning_sigma", "warmup_step", "train_iters", "dfake_gen_update_ratio", "batch_size", "label_dim",
        "resolution", "generator_lr", "guidance_lr", "max_grad_norm", "gan_classifier", "use_fp16")}
    args.label_dim, args.resolution = LABEL_DIM, RESOLUTION  # The tiny network's; the rest is the recipe's.

    from third_party.edm.training.networks import EDMPrecond  # noqa: E402
    # get_edm_network's arguments but the network's size; its sigma_min=0 and sigma_max=inf are the defaults.
    teacher_kwargs = dict(img_resolution=RESOLUTION, img_channels=CHANNELS, label_dim=LABEL_DIM, use_fp16=False,
                          sigma_data=args.sigma_data, **TINY_ADM)
    teacher = EDMPrecond(**teacher_kwargs)
    fill_parameters(teacher, torch.Generator().manual_seed(1))
    model = build_model(train_edm, args, EDMPrecond, teacher_kwargs, teacher)
    guidance = model.guidance_model

    tensors = record_sigma_distributions(guidance)
    iteration_tensors, iteration = record_iteration(model, args, teacher_kwargs, seed=20)
    tensors.update(iteration_tensors)
    for count in PROCESS_COUNTS:
        tensors.update(record_warmup(train_edm, args, count))

    options.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(options.out / "dmd2.safetensors"))
    meta = dict(
        note="Written by scripts/reference/dmd2.py from DMD2's own code; read by tests/test_reference_sid_dmd2.py.",
        repository="https://github.com/tianweiy/DMD2", commit=options.commit,
        command=f"python scripts/reference/dmd2.py <DMD2 checkout> {options.out} --commit {options.commit}",
        torch_version=torch.__version__, recipe=RECIPE, recipe_nproc_per_node=nproc, recipe_settings=recipe_settings,
        guidance=dict(min_step=guidance.min_step, max_step=guidance.max_step,
                      num_train_timesteps=guidance.num_train_timesteps),
        sigma=dict(num_draws=NUM_DRAWS, generator="compute_distribution_matching_loss, sigma handed to the networks",
                   fake="compute_loss_fake, sigma handed to the fake score", counts="draws per level of sigma/grid"),
        iteration=iteration,
        warmup=dict(iterations=WARMUP_ITERATIONS, process_counts=list(PROCESS_COUNTS),
                    scheduler="diffusers get_scheduler('constant_with_warmup', num_warmup_steps=warmup_step) in "
                              "accelerate's AcceleratedScheduler (split_batches False: num_processes steps a call)",
                    accelerate_version=__import__("accelerate").__version__,
                    diffusers_version=__import__("diffusers").__version__,
                    series="the lr factor in effect at each iteration's update (the generator updates only at "
                           "iterations divisible by dfake_gen_update_ratio; its scheduler still steps every one)"),
        conventions=dict(z="unit normal; DMD2's scaled_noise is conditioning_sigma * z", loss_dm="0.5 mse, mean over "
                         "all elements", loss_fake_mean="mean over all elements", weights="the state dict's values "
                         "flattened in order (layout in iteration.state_dict), float16 in the file, exact float32 "
                         "values", grads="parameters' gradients flattened in order (state_dict entries marked true)"))
    (options.out / "dmd2.json").write_text(compact_json(meta))
    size = (options.out / "dmd2.safetensors").stat().st_size
    print(f"wrote {options.out / 'dmd2.safetensors'} ({size} bytes) and dmd2.json")


if __name__ == "__main__":
    main()
