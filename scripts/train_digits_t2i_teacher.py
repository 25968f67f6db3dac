"""Train the SD-style digits text-to-image teacher: an AutoencoderKL, then a UNet2DConditionModel and a CLIPTextModel.

Stages (each skipped or resumed when its output is in OUT):

1. vae: an AutoencoderKL (32x32x3 -> 8x8x4) trained on the 1797 digits with L1 + L2 reconstruction and a small KL
   term; its scaling_factor is then set to 1 / std of the latents, as SD's 0.18215 was. Writes OUT/vae/.
2. denoiser: the UNet and the text encoder trained together from scratch (no pretrained CLIP: the captions' few dozen
   words are learnt with the images) with SD's epsilon-prediction DDPM loss on the scaled latents, a caption drawn
   per image per step from the caption grammar, 10% of captions dropped to "" for classifier-free guidance, AdamW,
   and an EMA of both networks. Writes OUT/denoiser.pt (resume checkpoint) every --checkpoint-minutes and at the end.
3. pipeline: the EMA weights saved as a StableDiffusionPipeline folder OUT/pipeline/ with training.json; then a quick
   check samples 4 images per "the digit {d}" with the saved folder and reports the 8x8 digits classifier's accuracy.

    PYTHONPATH=. python scripts/train_digits_t2i_teacher.py --out runs/digits_sd

Each stage stops at its --*-steps or --*-minutes, whichever comes first; re-running with more steps continues the
denoiser from its checkpoint. OUT/log.jsonl holds the options, then one line per tick. docs/digits-t2i.md tells the
results and the commands that produced them.

`--objective rectified_flow` trains the flow-matching (SD3-style) teacher instead: no autoencoder stage; an
SD3Transformer2DModel learns the rectified-flow velocity on the latents of --sd-teacher's VAE, conditioned by that
teacher's frozen CLIP text encoder (onestep_cli/digits/flow_teacher.py), with the same loop, EMA, checkpoints and
check; OUT/pipeline/ is a StableDiffusion3Pipeline folder linking to --sd-teacher's VAE, tokenizer and text encoder:

    PYTHONPATH=. python scripts/train_digits_t2i_teacher.py --objective rectified_flow --out runs/digits_flow
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from onestep_cli.digits import flow_teacher
from onestep_cli.digits import t2i_teacher as kit
from onestep_cli.engine.ema import ema_beta

SMOKE = dict(vae_channels="8,8,8", text_hidden=8, text_layers=1, unet_channels="8,16", vae_steps=2, denoiser_steps=3,
             batch_size=4, vae_batch_size=4, samples_per_digit=1, check_steps=2, transformer="tiny")  # For tests.
SHIPPED_SD_TEACHER = Path(kit.__file__).resolve().parents[1] / "assets" / "digits_t2i_teacher"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Output folder (created; an existing one is resumed).")
    p.add_argument("--log", type=Path, default=None, help="JSONL log (default OUT/log.jsonl; appended to).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's).")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast the denoiser's forward on CUDA (fp32 weights, optimizer and EMA).")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialisation, batches, captions and noise.")
    p.add_argument("--smoke", action="store_true", help="Tiny networks and a few steps (tests).")
    p.add_argument("--objective", choices=["epsilon", "rectified_flow"], default="epsilon",
                   help="epsilon: the SD-style teacher (UNet, SD's DDPM loss); rectified_flow: the SD3-style one.")
    p.add_argument("--sd-teacher", type=Path, default=SHIPPED_SD_TEACHER,
                   help="rectified_flow: the SD-style teacher folder whose VAE, tokenizer and text encoder it uses.")
    p.add_argument("--transformer", choices=sorted(flow_teacher.SIZES), default="small",
                   help="rectified_flow: SD3 transformer sizes (onestep_cli/digits/flow_teacher.py SIZES).")
    # Sizes.
    p.add_argument("--vae-channels", default="16,32,32", help="AutoencoderKL channels per level (3 levels: 32 -> 8).")
    p.add_argument("--text-hidden", type=int, default=32, help="CLIPTextModel width (embedding 49408 x this).")
    p.add_argument("--text-layers", type=int, default=2, help="CLIPTextModel transformer layers.")
    p.add_argument("--unet-channels", default="32,64", help="UNet channels at 8x8 and 4x4.")
    # Stage 1: the autoencoder.
    p.add_argument("--vae-steps", type=int, default=4000, help="Autoencoder steps at most.")
    p.add_argument("--vae-minutes", type=float, default=10.0, help="Autoencoder wall-clock cap, minutes.")
    p.add_argument("--vae-batch-size", type=int, default=64, help="Autoencoder images per step.")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="Autoencoder AdamW learning rate.")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="KL weight per latent element.")
    # Stage 2: the denoiser and text encoder.
    p.add_argument("--denoiser-steps", type=int, default=20000, help="Denoiser steps in total (resumes count).")
    p.add_argument("--denoiser-minutes", type=float, default=30.0, help="Denoiser wall-clock cap per run, minutes.")
    p.add_argument("--batch-size", type=int, default=256, help="Denoiser images per step.")
    p.add_argument("--lr", type=float, default=1e-3, help="Denoiser and text encoder AdamW learning rate.")
    p.add_argument("--lr-warmup-steps", type=int, default=500, help="Linear learning-rate warm-up, steps.")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay.")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="Fraction of captions replaced by ''.")
    p.add_argument("--ema-halflife-kimg", type=float, default=100.0, help="Largest EMA half-life, kimg.")
    p.add_argument("--ema-rampup-ratio", type=float, default=0.1, help="EMA half-life <= this x images seen.")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="Minutes between resume checkpoints.")
    p.add_argument("--tick-seconds", type=float, default=20.0, help="Seconds between log lines.")
    # Stage 3: the check.
    p.add_argument("--samples-per-digit", type=int, default=4, help="Check images per digit ('the digit {d}').")
    p.add_argument("--check-steps", type=int, default=25, help="Sampler steps of the check.")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="Classifier-free guidance scale of the check.")
    p.add_argument("--heldout-check", action="store_true",
                   help="Also score prompt_accuracy on the 320 held-out phrasings, each drawn once with --seed.")
    p.add_argument("--check-only", action="store_true", help="Only run the check(s) on OUT/pipeline.")
    args = p.parse_args(argv)
    if args.smoke:  # A preset: options given explicitly still win.
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    if not 0 <= args.caption_dropout < 1:
        p.error(f"--caption-dropout {args.caption_dropout} is not a fraction in [0, 1); 0.1 is SD's usual choice.")
    return args


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


class Log:
    """Appends JSON records to a file and prints them."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")

    def __call__(self, record: dict) -> None:
        line = json.dumps(record)
        self.file.write(line + "\n")
        self.file.flush()
        print(line, flush=True)


def vae_stage(args, images: torch.Tensor, log: Log):
    """OUT/vae/: the trained autoencoder with its latent scaling factor (loaded when already there)."""
    from diffusers import AutoencoderKL

    folder = args.out / "vae"
    if (folder / "config.json").is_file():
        log({"stage": "vae", "resumed_from": str(folder)})
        return AutoencoderKL.from_pretrained(folder).to(images.device).eval()
    torch.manual_seed(args.seed)
    channels = ints(args.vae_channels)
    vae = kit.build_vae(channels, norm_num_groups=min(8, *channels)).to(images.device)
    settings = kit.VAETraining(steps=args.vae_steps, minutes=args.vae_minutes, batch_size=args.vae_batch_size,
                               lr=args.vae_lr, kl_weight=args.kl_weight)
    generator = torch.Generator(device=images.device).manual_seed(args.seed)
    start = time.time()
    record = kit.train_vae(vae, images, settings, generator, log)
    scaling = kit.latent_scaling_factor(vae, images, seed=args.seed)
    vae.register_to_config(scaling_factor=scaling)
    summary = {"stage": "vae", "done": True, "steps": record["step"], "final": record,
               "reconstruction_mae": kit.reconstruction_error(vae, images), "scaling_factor": scaling,
               "parameters": kit.parameter_count(vae), "wall_s": round(time.time() - start, 1)}
    vae.save_pretrained(folder, safe_serialization=True)
    (folder / "vae_training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(summary)
    return vae


def build_denoiser(args):
    """The untrained text encoder and UNet of the configured sizes."""
    torch.manual_seed(args.seed + 1)
    text_encoder = kit.build_text_encoder(hidden_size=args.text_hidden, num_layers=args.text_layers,
                                          num_heads=max(1, args.text_hidden // 8))
    channels = ints(args.unet_channels)
    unet = kit.build_unet(cross_attention_dim=args.text_hidden, block_out_channels=channels,
                          norm_num_groups=min(8, *channels))
    return text_encoder, unet


class EpsilonTask:
    """SD's objective: the UNet and the text encoder trained together on the epsilon MSE of a DDPM timestep."""

    def __init__(self, args, tokenizer, device: torch.device):
        text_encoder, unet = (m.to(device).train() for m in build_denoiser(args))
        self.trained = {"unet": unet, "text_encoder": text_encoder}
        self.scheduler = kit.training_scheduler()
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.table = kit.digits_token_table(tokenizer)

    def loss(self, latents: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        return kit.denoising_loss(self.trained["unet"], self.trained["text_encoder"], self.scheduler, latents,
                                  self.table(captions), generator)


class RectifiedFlowTask:
    """SD3's objective: the transformer alone on the rectified-flow velocity MSE, under a frozen text encoder whose
    conditions of every caption the grammar can draw are computed once by the pipeline itself."""

    def __init__(self, args, vae, text_encoder, tokenizer, device: torch.device):
        torch.manual_seed(args.seed + 1)
        text_width = int(text_encoder.config.hidden_size)
        transformer = flow_teacher.build_transformer(flow_teacher.SIZES[args.transformer], text_width)
        self.trained = {"transformer": transformer.to(device).train()}
        captions = [*kit.prompt_list(), ""]
        pipeline = flow_teacher.build_pipeline(transformer, vae, text_encoder, tokenizer)
        embeds, pooled = flow_teacher.encode_caption_table(pipeline, captions)
        self.row = {caption: i for i, caption in enumerate(captions)}
        self.embeds, self.pooled = embeds.to(device), pooled.to(device)

    def loss(self, latents: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        rows = torch.tensor([self.row[c] for c in captions], device=latents.device)
        return flow_teacher.rectified_flow_loss(self.trained["transformer"], latents, self.embeds[rows],
                                                self.pooled[rows], generator)


def denoiser_stage(args, task, vae, images: torch.Tensor, prompts, log: Log):
    """Train (or resume) `task`'s networks; returns their EMA copies by name and the last progress record."""
    device = images.device
    averages = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in task.trained.items()}
    trained = [p for m in task.trained.values() for p in m.parameters()]
    averaged = [p for m in averages.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    # Captions and batch indices come from a CPU generator (the caption grammar draws on the CPU); noise from one on
    # the device, so a CPU run is bitwise repeatable and a GPU run does not sync per draw.
    host_gen = torch.Generator().manual_seed(args.seed)
    device_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    latent_mean, latent_std = kit.encode_posteriors(vae, images)
    scaling = float(vae.config.scaling_factor)
    # Resume checkpoints name each network and its EMA: unet, text_encoder, ema_unet, ema_text_encoder (SD-style).
    modules = {**task.trained, **{f"ema_{name}": m for name, m in averages.items()}, "optimizer": optimizer}

    checkpoint_path = args.out / "denoiser.pt"
    step = 0
    if checkpoint_path.is_file():
        # On the CPU: generator states must be CPU tensors, and load_state_dict moves the rest to each module's device.
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        for key, module in modules.items():
            module.load_state_dict(state[key])
        host_gen.set_state(state["host_generator"])
        device_gen.set_state(state["device_generator"])
        step = int(state["step"])
        log({"stage": "denoiser", "resumed_from": str(checkpoint_path), "step": step})

    def save_checkpoint():
        state = {**{key: module.state_dict() for key, module in modules.items()}, "step": step,
                 "host_generator": host_gen.get_state(), "device_generator": device_gen.get_state()}
        partial = checkpoint_path.with_name(checkpoint_path.name + ".partial")
        torch.save(state, partial)
        partial.replace(checkpoint_path)

    start = tick_time = checkpoint_time = time.time()
    tick_step, loss_sum, record = step, torch.zeros((), device=device), {"stage": "denoiser", "step": step}
    autocast = args.precision == "bf16" and device.type == "cuda"
    while step < args.denoiser_steps:
        index = torch.randint(images.shape[0], (args.batch_size,), generator=host_gen)
        captions = kit.training_captions([prompts[i] for i in index.tolist()], host_gen, args.caption_dropout)
        index = index.to(device)
        noise = torch.randn(latent_mean[index].shape, device=device, generator=device_gen)
        latents = (latent_mean[index] + latent_std[index] * noise) * scaling
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = task.loss(latents, captions, device_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min((step + 1) / max(args.lr_warmup_steps, 1), 1)
        optimizer.step()
        step += 1
        decay = ema_beta(args.batch_size, args.ema_halflife_kimg, args.ema_rampup_ratio, step * args.batch_size)
        with torch.no_grad():
            torch._foreach_lerp_(averaged, trained, 1 - decay)
        loss_sum += loss.detach()

        now = time.time()
        done = step >= args.denoiser_steps or now - start >= args.denoiser_minutes * 60
        if now - tick_time >= args.tick_seconds or done:
            record = {"stage": "denoiser", "step": step, "kimg": step * args.batch_size / 1000,
                      "loss": float(loss_sum) / (step - tick_step), "lr": optimizer.param_groups[0]["lr"],
                      "ema_decay": decay, "steps_per_s": (step - tick_step) / (now - tick_time),
                      "elapsed_s": round(now - start, 1)}
            log(record)
            tick_time, tick_step, loss_sum = now, step, torch.zeros((), device=device)
        if now - checkpoint_time >= args.checkpoint_minutes * 60 or done:
            save_checkpoint()
            checkpoint_time = now
        if done:
            break
    return averages, {**record, "wall_s": round(time.time() - start, 1)}


def check(args, folder: Path, log: Log) -> dict:
    """Sample the saved folder as a user would, and score "the digit {d}" with the 8x8 digits classifier."""
    start = time.time()
    sample = flow_teacher.sample_digits if args.objective == "rectified_flow" else kit.sample_digits
    images, labels = sample(folder, per_digit=args.samples_per_digit, num_inference_steps=args.check_steps,
                            guidance_scale=args.guidance_scale, seed=args.seed, device=args.device)
    accuracy, provenance = kit.quick_class_accuracy(images, labels)
    real_images, real_prompts = kit.captioned_digits()
    real_accuracy, _ = kit.quick_class_accuracy(real_images, torch.tensor([p.digit for p in real_prompts]))
    record = {"stage": "check", "prompt": "the digit {d}", "num_samples": int(labels.numel()),
              "num_inference_steps": args.check_steps, "guidance_scale": args.guidance_scale,
              "quick_class_accuracy": accuracy, "per_class": provenance["per_class_accuracy"],
              "real_digits_quick_class_accuracy": real_accuracy, "wall_s": round(time.time() - start, 1)}
    if args.heldout_check:
        record["heldout"] = heldout_check(args, folder)
    log(record)
    return record


def heldout_check(args, folder: Path) -> dict:
    """prompt_accuracy (and weight and slant agreement) of the saved folder's own sampler on every held-out phrasing,
    each drawn once from seed --seed: the numbers docs/digits-t2i.md reports."""
    from diffusers import DiffusionPipeline

    from onestep_cli.denoisers.diffusers.loading import absent_components
    from onestep_cli.digits.prompt_following import prompt_accuracy

    prompts = (SHIPPED_SD_TEACHER.parent / "digits_t2i_prompts" / "heldout.txt").read_text().splitlines()
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True, **absent_components(folder))
    pipeline.set_progress_bar_config(disable=True)
    tokens = {"max_sequence_length": flow_teacher.MAX_SEQUENCE_LENGTH} if args.objective == "rectified_flow" else {}
    start = time.time()
    images = pipeline(prompts, num_inference_steps=args.check_steps, guidance_scale=args.guidance_scale,
                      generator=[torch.Generator().manual_seed(args.seed) for _ in prompts], output_type="pt",
                      **tokens).images
    accuracy, provenance = prompt_accuracy(images.float() * 2 - 1, prompts)
    return {"sampler": f"{type(pipeline).__name__}, {type(pipeline.scheduler).__name__} {args.check_steps} steps",
            "guidance_scale": args.guidance_scale, "seed": args.seed, "num_prompts": len(prompts),
            "prompt_accuracy": accuracy, "weight_agreement": provenance["weight_agreement"],
            "slant_agreement": provenance["slant_agreement"], "wall_s": round(time.time() - start, 1)}


def quiet_progress_bars() -> None:
    """The JSONL log is the progress report; diffusers' and transformers' load/save bars would interleave with it."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "scripts/train_digits_t2i_teacher.py", *argv])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_progress_bars()
    device = torch.device(args.device)
    log = Log(args.log or args.out / "log.jsonl")
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")
    log({"options": {k: str(v) for k, v in vars(args).items()}, "command": command, "device": device_name,
         "torch": torch.__version__})

    if args.check_only:
        return check(args, args.out / "pipeline", log)
    images, prompts = kit.captioned_digits()
    images = images.to(device)
    if args.objective == "rectified_flow":
        return train_flow_teacher(args, command, device_name, images, prompts, log)
    tokenizer = kit.clip_tokenizer()
    vae = vae_stage(args, images, log)
    averages, denoiser_record = denoiser_stage(args, EpsilonTask(args, tokenizer, device), vae, images, prompts, log)
    ema_text, ema_unet = averages["text_encoder"], averages["unet"]

    folder = args.out / "pipeline"
    vae_summary = json.loads((args.out / "vae" / "vae_training.json").read_text())
    training = {"command": command, "options": {k: str(v) for k, v in vars(args).items()},
                "data": "sklearn digits, 1797 images at 32x32 RGB grey, captions from onestep_cli.digits.captions",
                "text_encoder": "trained from scratch jointly with the UNet", "vae": vae_summary,
                "denoiser": denoiser_record,
                "parameters": {name: kit.parameter_count(m) for name, m in
                               (("vae", vae), ("text_encoder", ema_text), ("unet", ema_unet))},
                "weights": "EMA of the UNet and text encoder", "device": device_name, "torch": torch.__version__}
    kit.save_pipeline(folder, vae.cpu(), ema_text.cpu(), tokenizer, ema_unet.cpu(), training)
    return finish(args, folder, training, log)


def train_flow_teacher(args, command: str, device_name: str, images: torch.Tensor, prompts, log: Log) -> dict:
    """The rectified-flow objective: the SD3 transformer on --sd-teacher's latents and frozen text encoder."""
    folder = args.out / "pipeline"
    flow_teacher.link_shared_parts(folder, args.sd_teacher)  # First, so training reads the parts as saved.
    vae, text_encoder, tokenizer = flow_teacher.shared_parts(folder)
    vae = vae.to(images.device)
    task = RectifiedFlowTask(args, vae, text_encoder, tokenizer, images.device)
    averages, denoiser_record = denoiser_stage(args, task, vae, images, prompts, log)
    transformer = averages["transformer"].cpu()
    training = {"command": command, "options": {k: str(v) for k, v in vars(args).items()},
                "data": "sklearn digits, 1797 images at 32x32 RGB grey, captions from onestep_cli.digits.captions",
                "objective": "rectified flow, t ~ logit-normal(0, 1), velocity MSE (SD3)",
                "text_encoder": f"frozen: the CLIP text encoder of {args.sd_teacher.name} (identity projection)",
                "vae": f"{args.sd_teacher.name}'s, scaling_factor {vae.config.scaling_factor:.4f}",
                "denoiser": denoiser_record,
                "network": {"transformer": args.transformer, **vars(flow_teacher.SIZES[args.transformer])},
                "parameters": {"transformer": kit.parameter_count(transformer)},
                "weights": "EMA of the transformer", "device": device_name, "torch": torch.__version__}
    flow_teacher.save_pipeline(folder, transformer, args.sd_teacher, training)
    return finish(args, folder, training, log)


def finish(args, folder: Path, training: dict, log: Log) -> dict:
    """The quick check of the saved folder, and the summary written to its training.json."""
    training["check"] = check(args, folder, log)
    training["folder_bytes"] = kit.folder_size_bytes(folder)
    (folder / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    log({"saved": str(folder), "folder_bytes": training["folder_bytes"]})
    return training


if __name__ == "__main__":
    main()
