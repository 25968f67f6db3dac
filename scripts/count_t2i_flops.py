"""FLOPs of one PixArt-alpha XL/2 (512 px) and one SDXL UNet (1024 px) forward, counted on the meta device (no
weights, no memory), and of the pixart-sim and sdxl-sim SIM steps built from them: the model FLOPs per image that a
FLOP utilisation of those presets' training steps divides by. Needs diffusers; CPU, seconds:

    python scripts/count_t2i_flops.py [--text-tokens 120]

torch.utils.flop_counter counts the matrix products and attention (multiply-add = 2 FLOPs); element-wise work is
not counted, as in onestep_cli/bench/count.py. The step's passes, in forward equivalents F (a backward pass that
makes input and weight gradients costs 2F, one that makes only input gradients 1F):
  fake-score update:  generator forward F (no grad) + fake forward F + backward 2F                       = 4F
  generator update:   generator forward + backward 3F, teacher conditional and unconditional forwards with
                      input-gradient backwards 2 x 2F (guidance), fake forward with input-gradient backward 2F = 9F
so 13F per image; the text encoder (T5-XXL, run once per prompt and cached in the run) and the VAE are not in the step.
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

PASSES_PER_STEP = 13  # Forward equivalents of one SIM step with a guided teacher (see above).


def pixart_forward_flops(text_tokens: int) -> float:
    import diffusers

    with torch.device("meta"):
        transformer = diffusers.PixArtTransformer2DModel(  # PixArt-XL-2-512x512's transformer config.
            sample_size=64, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
            caption_channels=4096, in_channels=4, cross_attention_dim=1152, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
        latents = torch.randn(1, 4, 64, 64)
        text = torch.randn(1, text_tokens, 4096)
        timestep = torch.tensor([500])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        transformer(latents, encoder_hidden_states=text, timestep=timestep, added_cond_kwargs={
            "resolution": None, "aspect_ratio": None})
    return float(counter.get_total_flops())


def sdxl_forward_flops() -> float:
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(  # SDXL base 1.0's UNet config.
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        latents, text = torch.randn(1, 4, 128, 128), torch.randn(1, 77, 2048)
        added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
        timestep = torch.tensor([500])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added)
    return float(counter.get_total_flops())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-tokens", type=int, default=120, help="T5 tokens per prompt (PixArt-alpha pads to 120).")
    args = parser.parse_args()
    forward = pixart_forward_flops(args.text_tokens)
    print(f"PixArt-alpha XL/2 512 px forward, 1 image, {args.text_tokens} text tokens: {forward / 1e9:.1f} GFLOP")
    print(f"pixart-sim SIM step: {PASSES_PER_STEP} x forward = {PASSES_PER_STEP * forward / 1e12:.2f} TFLOP per image")
    forward = sdxl_forward_flops()
    print(f"SDXL UNet forward, 1 image at 1024 px (128x128 latents), 77 text tokens: {forward / 1e9:.1f} GFLOP")
    print(f"sdxl-sim SIM step: {PASSES_PER_STEP} x forward = {PASSES_PER_STEP * forward / 1e12:.2f} TFLOP per image "
          "(gradient checkpointing's recomputation not counted: model FLOPs)")


if __name__ == "__main__":
    main()
