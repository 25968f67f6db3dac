"""One-GPU SIM step of pixart-sim with a random-init full-size PixArt-alpha XL/2 512 pipeline (T5-XXL text encoder,
SD VAE; built from their configs since weights cannot be downloaded). Times `Trainer.step()` through the engine.

Usage: python scripts/pixart_step.py --out /tmp/pixart --batch 16 --steps 4 [--set train.compile=true]
    [--text-encoder-layers 2] [--profile] [--json-out result.json]

The step never runs the text encoder (the prompts are encoded once and cached in the run), so `--text-encoder-layers`
below T5-XXL's 24 only shortens the pipeline's build and load; every step-time number is the same. The FLOP
utilisation uses scripts/count_t2i_flops.py's count (13 forward equivalents per image).
"""

import argparse
import time
from pathlib import Path

import torch
from t2i_step_timing import add_timing_arguments, time_preset_steps


def build_pixart(folder: Path, text_encoder_layers: int = 24) -> None:
    import diffusers
    import transformers

    letters = [(c, -float(i)) for i, c in enumerate("▁abcdefghijklmnopqrstuvwxyz")]
    tokenizer = transformers.T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *letters], extra_ids=0)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(  # T5 v1.1 XXL.
        vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=text_encoder_layers, num_heads=64,
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
    parser.add_argument("--text-encoder-layers", type=int, default=24, help="T5 layers (XXL has 24); see above.")
    add_timing_arguments(parser)
    args = parser.parse_args()
    start = time.time()
    pipeline = args.out / f"pipeline-t5x{args.text_encoder_layers}"
    if not (pipeline / "model_index.json").is_file():
        build_pixart(pipeline, args.text_encoder_layers)
    print(f"pipeline ready in {time.time() - start:.0f} s", flush=True)
    from count_t2i_flops import PASSES_PER_STEP, pixart_forward_flops

    flops = PASSES_PER_STEP * pixart_forward_flops(text_tokens=120)
    time_preset_steps("pixart-sim", pipeline, args.out, args.batch, args.steps, args.overrides,
                      flops_per_image=flops, profile=args.profile, ready=args.ready, go=args.go,
                      json_out=args.json_out)


if __name__ == "__main__":
    main()
