"""Shared by sdxl_step.py and pixart_step.py: time `Trainer.step()` of a text-to-image preset on a saved pipeline."""

import json
import time
from pathlib import Path

import torch

PROMPTS = "a photo of a cat\na red bicycle in the rain\nan astronaut riding a horse\na bowl of fruit\n"


def time_preset_steps(preset: str, pipeline: Path, out: Path, batch: int, steps: int, overrides=(),
                      device: str = "cuda") -> dict:
    """Build the preset's networks on `pipeline`, run `steps` Trainer steps (bf16 on CUDA, fp32 on CPU) and return
    the median time of the steps after the first, images/s and peak memory; prints each step and the result."""
    from onestep_cli.config import resolve_config
    from onestep_cli.engine.networks import build_networks
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
    steady = sorted(times[1:])[len(times[1:]) // 2]  # The first step pays for allocation and autotuning.
    result = {"preset": preset, "batch": batch, "seconds_per_step": steady, "images_per_s": batch / steady,
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    print(json.dumps(result))
    return result
