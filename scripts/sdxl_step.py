"""One-GPU SIM step of sdxl-sim with a random-init full-size SDXL pipeline (weights cannot be downloaded; size is
what matters). Builds the pipeline from SDXL base 1.0's configs, saves it, then times `Trainer.step()` through the
engine (no checkpoint is written: three full UNets with Adam states would be ~60 GB of disk).

Usage: python scripts/sdxl_step.py --out /tmp/sdxl --batch 4 --steps 4 [--lora-rank 0]
"""

import argparse
import time
from pathlib import Path

import torch
from t2i_step_timing import PROMPTS, time_preset_steps


def build_sdxl(folder: Path) -> None:
    import diffusers
    import transformers

    chars = [chr(c) for c in [*range(33, 127), *range(161, 173), *range(174, 256)]]
    chars += [chr(256 + n) for n in range(256 - len(chars))]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = lambda: transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = lambda **kw: transformers.CLIPTextConfig(**{
        "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 512, "eos_token_id": 513,
        "pad_token_id": 513, "hidden_act": "quick_gelu", **kw})
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3,
                                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=1024,
                                  scaling_factor=0.13025)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, unet=unet, tokenizer=tokenizer(), tokenizer_2=tokenizer(),
        text_encoder=transformers.CLIPTextModel(text(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                     num_attention_heads=12)),
        text_encoder_2=transformers.CLIPTextModelWithProjection(text(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu")),
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   num_train_timesteps=1000), force_zeros_for_empty_prompt=True)
    print(f"SDXL UNet parameters: {sum(p.numel() for p in unet.parameters()) / 1e9:.3f} B", flush=True)
    pipe.save_pretrained(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sdxl"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--build-only", action="store_true",
                        help="Only write the pipeline and prompts (for --gpus runs).")
    args = parser.parse_args()
    start = time.time()
    pipeline = args.out / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        build_sdxl(pipeline)
    print(f"pipeline ready in {time.time() - start:.0f} s", flush=True)
    if args.build_only:
        (args.out / "prompts.txt").write_text(PROMPTS)
        return
    time_preset_steps("sdxl-sim", pipeline, args.out, args.batch, args.steps,
                      [f"generator.lora_rank={args.lora_rank}", f"fake.lora_rank={args.lora_rank}"])


if __name__ == "__main__":
    main()
