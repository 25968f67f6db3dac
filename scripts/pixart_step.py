"""One-GPU SIM step of pixart-sim with a random-init full-size PixArt-alpha XL/2 512 pipeline (T5-XXL text encoder,
SD VAE; built from their configs since weights cannot be downloaded). Times `Trainer.step()` through the engine.

Usage: python scripts/pixart_step.py --out /tmp/pixart --batch 16 --steps 4
"""

import argparse
import time
from pathlib import Path

import torch
from t2i_step_timing import time_preset_steps


def build_pixart(folder: Path) -> None:
    import diffusers
    import transformers

    letters = [(c, -float(i)) for i, c in enumerate("▁abcdefghijklmnopqrstuvwxyz")]
    tokenizer = transformers.T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *letters], extra_ids=0)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(  # T5 v1.1 XXL.
        vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new")).to(torch.bfloat16)
    transformer = diffusers.PixArtTransformer2DModel(  # PixArt-XL-2-512x512.
        sample_size=64, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
        caption_channels=4096, in_channels=4, cross_attention_dim=1152, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3,
                                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                                      num_train_timesteps=1000)
    print(f"PixArt transformer parameters: {sum(p.numel() for p in transformer.parameters()) / 1e6:.0f} M; "
          f"T5 {sum(p.numel() for p in t5.parameters()) / 1e9:.2f} B", flush=True)
    diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer,
                                  scheduler=scheduler).save_pretrained(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/pixart"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    start = time.time()
    pipeline = args.out / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        build_pixart(pipeline)
    print(f"pipeline ready in {time.time() - start:.0f} s", flush=True)
    time_preset_steps("pixart-sim", pipeline, args.out, args.batch, args.steps)


if __name__ == "__main__":
    main()
