"""Shared by sdxl_step.py and pixart_step.py: time `Trainer.step()` of a text-to-image preset on a saved pipeline."""

import json
import time
from pathlib import Path

import torch

PROMPTS = "a photo of a cat\na red bicycle in the rain\nan astronaut riding a horse\na bowl of fruit\n"


def add_timing_arguments(parser) -> None:
    """The options every text-to-image timing script shares."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="A config override, as `onestep distill --set` (repeatable).")
    parser.add_argument("--profile", action="store_true", help="Also profile one step: GPU kernel time by kind.")
    parser.add_argument("--json-out", type=Path, default=None, help="Write the result as JSON here.")
    parser.add_argument("--ready", type=Path, default=None, help="After the first step (compilation), create this "
                        "file and wait for --go to exist before timing: lets another process compile meanwhile.")
    parser.add_argument("--go", type=Path, default=None)


def time_preset_steps(preset: str, pipeline: Path, out: Path, batch: int, steps: int, overrides=(),
                      device: str = "cuda", flops_per_image: float | None = None, profile: bool = False,
                      ready: Path | None = None, go: Path | None = None, json_out: Path | None = None) -> dict:
    """Build the preset's networks on `pipeline`, run `steps` Trainer steps (bf16 on CUDA, fp32 on CPU) and return
    the median time of the steps after the first, images/s and peak memory; prints each step and the result.
    `flops_per_image` (model FLOPs of one step per image) adds the FLOP utilisation against `onestep bench`'s
    PEAK_BF16_FLOPS."""
    from onestep_cli.bench import PEAK_BF16_FLOPS
    from onestep_cli.config import resolve_config
    from onestep_cli.runs.networks import build_networks
    from onestep_cli.engine.trainer import Trainer

    prompts = out / "prompts.txt"
    prompts.write_text(PROMPTS)
    config = resolve_config(preset, overrides=[f"teacher.path={pipeline}", f"prompts.path={prompts}",
                                               f"train.batch_size={batch}", "train.parallelism=ddp", *overrides])
    device = torch.device(device)
    cuda = device.type == "cuda"
    trainer = Trainer(config, build_networks(config, run_dir=out), device, "bf16" if cuda else "fp32")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        tick = time.time()
        stats = trainer.step()
        sync()
        times.append(time.time() - tick)
        print(f"step {len(times)}: {times[-1]:.2f} s, loss_gen {float(stats['loss_generator']):+.4e}", flush=True)
        if len(times) == 1 and ready is not None:  # Compiled: let the next process compile while this one waits.
            ready.touch()
            while not go.exists():
                time.sleep(0.5)
    steady = sorted(times[1:])[len(times[1:]) // 2]  # The first step pays for allocation, autotuning, compilation.
    result = {"preset": preset, "batch": batch, "overrides": list(overrides), "seconds_per_step": steady,
              "first_step_s": times[0], "images_per_s": batch / steady,
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "graph_captured": trainer.step_graph.captured if trainer.step_graph is not None else None,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    if flops_per_image:
        result["model_tflops_per_s"] = flops_per_image * batch / steady / 1e12
        result["flop_utilisation"] = flops_per_image * batch / steady / PEAK_BF16_FLOPS
    if profile and cuda:
        result["kernel_seconds_by_kind"] = profile_step_kernels(trainer.step)
    print(json.dumps(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
    return result


def profile_step_kernels(step) -> dict[str, float]:
    """GPU kernel seconds of one call of `step`, by kind (scripts/profile_step.py's kinds); prints them."""
    from profile_step import kernel_seconds, print_kernels, seconds_by_kind

    kernels = kernel_seconds(step, iterations=1)
    print_kernels(kernels, top=15)
    return seconds_by_kind(kernels)
