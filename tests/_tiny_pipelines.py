"""Tiny random diffusers snapshots of each checkpoint layout, built with diffusers' / transformers' own classes and
saved as ordinary snapshots (save_pretrained, safetensors) with a stray pickle `.bin` beside them.

Layouts: concat (the paper's: UNet2DModel, latent + encoded degraded frame), sd-inpaint (UNet2DConditionModel,
9 channels, CLIP text encoder + tokenizer), sd-upscale (7 channels, noise_level class labels, VAE factor 4,
low_res_scheduler), sdxl-inpaint (two text encoders, added text embeddings and time ids). No weights are
downloaded: the CLIP tokenizer is built from a vocabulary written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 16
TOKENS = 16


def _stray_pickle(sub: Path) -> None:
    """A pickle beside the safetensors (as in many real snapshots): it must never be read."""
    (sub / ("diffusion_pytorch_model.bin" if (sub / "diffusion_pytorch_model.safetensors").exists() else "pytorch_model.bin")
     ).write_bytes(b"\x80\x04\x95\x00not-a-real-pickle.")


def save_tokenizer(directory: Path) -> None:
    """A CLIP BPE tokenizer over single letters (vocabulary written here, no merges), padded to TOKENS."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS).save_pretrained(directory)


def save_text_encoder(directory: Path, projection: bool = False, seed: int = 0) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=2 + 2 * 26, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=TEXT_DIM,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    model.save_pretrained(directory, safe_serialization=True)
    _stray_pickle(directory)


def _vae(factor: int, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    n = {8: 4, 4: 3}[factor]
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=(8,) * n, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32)


def _cond_unet(in_channels: int, cross_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=4, norm_num_groups=4, **extra).eval()


def _save(component, sub: Path) -> None:
    component.save_pretrained(sub, safe_serialization=True)
    _stray_pickle(sub)


def _index(root: Path, pipeline: str) -> None:
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "_diffusers_version": "0.42.1"}))


def build_concat(root: Path) -> Path:
    """The paper's layout: UNet2DModel on concat(latent, encoded bicubic-upsampled frame) -> task sr8."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()
    _save(unet, root / "unet")
    _save(_vae(8), root / "vae")
    DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(root / "scheduler")
    return root


def build_sd_inpaint(root: Path) -> Path:
    """stable-diffusion-2-inpainting's structure: 9-channel cross-attention UNet, CLIP text encoder, DDIM."""
    from diffusers import DDIMScheduler

    _save(_cond_unet(9, TEXT_DIM), root / "unet")
    _save(_vae(8), root / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
                  prediction_type="epsilon").save_pretrained(root / "scheduler")
    save_text_encoder(root / "text_encoder")
    save_tokenizer(root / "tokenizer")
    _index(root, "StableDiffusionInpaintPipeline")
    return root


def build_sd_upscale(root: Path) -> Path:
    """stable-diffusion-x4-upscaler's structure: 7-channel UNet (latent + low-res RGB), noise_level class labels
    (num_class_embeds 1000), VAE factor 4, v prediction, a low_res_scheduler for the image's noise augmentation."""
    from diffusers import DDIMScheduler, DDPMScheduler

    _save(_cond_unet(7, TEXT_DIM, num_class_embeds=1000), root / "unet")
    vae = _vae(4)
    vae.register_to_config(scaling_factor=0.08333)
    _save(vae, root / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(root / "scheduler")
    DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).save_pretrained(root / "low_res_scheduler")
    save_text_encoder(root / "text_encoder")
    save_tokenizer(root / "tokenizer")
    _index(root, "StableDiffusionUpscalePipeline")
    return root


def build_sdxl_inpaint(root: Path) -> Path:
    """stable-diffusion-xl-1.0-inpainting's structure: two CLIP encoders (hidden states concatenated), added text
    embeddings (the 2nd encoder's pooled projection) and 6 time ids; Euler scheduler."""
    from diffusers import EulerDiscreteScheduler

    time_dim = 8
    unet = _cond_unet(9, 2 * TEXT_DIM, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                      projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_dim)
    _save(unet, root / "unet")
    _save(_vae(8), root / "vae")
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                           timestep_spacing="leading").save_pretrained(root / "scheduler")
    save_text_encoder(root / "text_encoder", seed=0)
    save_tokenizer(root / "tokenizer")
    save_text_encoder(root / "text_encoder_2", projection=True, seed=1)
    save_tokenizer(root / "tokenizer_2")
    _index(root, "StableDiffusionXLInpaintPipeline")
    return root


BUILDERS = {"concat": (build_concat, "sr8"), "sd-inpaint": (build_sd_inpaint, "inpaint"),
            "sd-upscale": (build_sd_upscale, "sr4"), "sdxl-inpaint": (build_sdxl_inpaint, "inpaint")}
