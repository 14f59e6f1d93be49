"""Denoisers in the EDM / Karras form D(x, sigma, cond) -> x0_hat, and latent-autoencoder wrappers.

* `EDMDenoiser`: our own `diffusers.UNet2DModel` with Karras et al. 2022 preconditioning (Table 1):
  D = c_skip x + c_out F(concat[c_in x, cond], c_noise), c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
  c_in = 1/sqrt(s^2+sd^2), c_noise = log(s)/4 (times `time_scale`, since diffusers' sinusoidal embedding
  resolves integer-scale timesteps).
* `VPDenoiser`: a diffusers UNet2DModel / UNet2DConditionModel trained as a discrete VP model (epsilon or
  v prediction) with its scheduler's alphas_cumprod, run in VE form as k-diffusion's `external.py` does:
  x_vp = x sqrt(abar) = x / sqrt(1 + s^2), s = sqrt((1 - abar)/abar), timestep = interpolation of the
  s -> t table in log s. Channel-concatenation conditioning; the encoded prompt (SD cross-attention, SDXL's
  added text embeddings and time ids) and class labels (the x4 upscaler's noise level) when the UNet takes them.
* `DiffusersAutoencoder`: AutoencoderKL / AutoencoderTiny with its scaling (and shift) factor, images in [0, 1].
* `LowResAugment`: the x4 upscaler's noise augmentation of its low-res conditioning image.

Every denoiser treats batch elements independently and is differentiable w.r.t. x.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .autoencoders import PCAAutoencoder


def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in) of Karras et al. 2022, Table 1, broadcastable to (B, 1, 1, 1)."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
    c_in = 1 / torch.sqrt(s**2 + sigma_data**2)
    return c_skip, c_out, c_in


def _sigma_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
    return sigma


def _concat(x_in: torch.Tensor, cond, expected: int) -> torch.Tensor:
    inp = x_in if cond is None else torch.cat([x_in, cond.to(x_in.dtype)], dim=1)
    if inp.shape[1] != expected:
        raise ValueError(f"the UNet takes {expected} input channels but x ({x_in.shape[1]}) + cond "
                         f"({0 if cond is None else cond.shape[1]}) give {inp.shape[1]}")
    return inp


class EDMDenoiser(nn.Module):
    """EDM-preconditioned UNet2DModel taking concat([c_in x, cond]); D(x, sigma, cond) -> x0_hat."""

    def __init__(self, unet: nn.Module, sigma_data: float = 1.0, time_scale: float = 250.0):
        super().__init__()
        if not (sigma_data > 0):
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.unet = unet
        self.sigma_data = float(sigma_data)
        self.time_scale = float(time_scale)

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = _sigma_batch(sigma, x)  # (B,)
        c_skip, c_out, c_in = edm_scalings(sigma, self.sigma_data)
        c_noise = self.time_scale * torch.log(sigma) / 4  # (B,)
        inp = _concat(c_in * x, cond, self.unet.config.in_channels).to(getattr(self.unet, "dtype", x.dtype))
        f = self.unet(inp, c_noise).sample  # (B, C, h, w)
        return c_skip * x + c_out * f.to(x.dtype)


class VPDenoiser(nn.Module):
    """Discrete-time VP diffusers UNet (epsilon / v_prediction) as a VE denoiser D(x, sigma, cond).

    `alphas_cumprod` (T,) comes from the model's scheduler. A UNet2DConditionModel takes `text`: a dict with
    "hidden" (1 or B, L, D) prompt embeddings and, for SDXL's added conditioning, "pooled" (1 or B, D2) and
    "time_ids" (1 or B, 6); it has no default (an unconditioned call is an error, not a zero prompt).
    `class_labels` (the x4 upscaler's noise level) is passed to the UNet at every call.
    The UNet runs in its own dtype (fp16 / bf16 weights); x, sigma and the result stay in the caller's dtype.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 encoder_hidden_states: torch.Tensor | None = None, class_labels: int | None = None):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        sigmas = ((1 - abar) / abar).sqrt()  # VP -> VE: sigma = sqrt((1 - abar) / abar)
        self.register_buffer("sigmas", sigmas.float())  # (T,) increasing
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.encoder_hidden_states = encoder_hidden_states
        self.class_labels = class_labels
        self.cross_attention = hasattr(unet.config, "cross_attention_dim") and unet.config.get("cross_attention_dim") is not None
        self.added_text_time = unet.config.get("addition_embed_type") == "text_time"

    def _apply(self, fn, *args, **kwargs):
        """Keep the sigma tables in float32 when the UNet is cast to fp16 (log sigma needs the precision)."""
        super()._apply(fn, *args, **kwargs)
        self.sigmas, self.log_sigmas = self.sigmas.float(), self.log_sigmas.float()
        return self

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep: linear interpolation of the (log sigma -> t) table (k-diffusion DiscreteSchedule)."""
        log_sigma = sigma.log().float()
        dists = log_sigma[:, None] - self.log_sigmas[None, :]  # (B, T)
        low = dists.ge(0).cumsum(dim=1).argmax(dim=1).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * high

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse: sigma at (fractional) timesteps t, interpolated in log sigma."""
        t = t.float().clamp(0, self.log_sigmas.shape[0] - 1)
        low = t.floor().long().clamp(max=self.log_sigmas.shape[0] - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def _text_kwargs(self, text: dict | None, batch: int, dtype) -> dict:
        if not self.cross_attention:
            return {}
        if text is None and self.encoder_hidden_states is not None:
            text = {"hidden": self.encoder_hidden_states}
        if text is None:
            raise ValueError("this UNet is text-conditioned (cross_attention_dim is set): pass the encoded prompt "
                             "(text={'hidden': (1, L, D)}, from the model's PromptEncoder); an empty prompt is "
                             "encoded too, never replaced by zeros")

        def rows(t):  # (1 or B, ...) -> (B, ...)
            t = t.to(dtype)
            return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t

        kwargs = {"encoder_hidden_states": rows(text["hidden"])}
        if self.added_text_time:
            if text.get("pooled") is None or text.get("time_ids") is None:
                raise ValueError("an SDXL UNet (addition_embed_type 'text_time') needs the pooled prompt embedding "
                                 "and the time ids (original size, crop, target size)")
            kwargs["added_cond_kwargs"] = {"text_embeds": rows(text["pooled"]), "time_ids": rows(text["time_ids"])}
        return kwargs

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, text: dict | None = None) -> torch.Tensor:
        sigma = _sigma_batch(sigma, x)  # (B,)
        s = sigma.reshape(-1, 1, 1, 1)
        c_in = 1 / torch.sqrt(s**2 + 1)  # x_vp = x_ve * sqrt(abar) = x_ve / sqrt(1 + sigma^2)
        t = self.sigma_to_t(sigma)
        dtype = getattr(self.unet, "dtype", x.dtype)
        inp = _concat(c_in * x, cond, self.unet.config.in_channels).to(dtype)  # (B, C + Cc, h, w)
        if encoder_hidden_states is not None:
            text = {**(text or {}), "hidden": encoder_hidden_states}
        kwargs = self._text_kwargs(text, x.shape[0], dtype)
        if self.class_labels is not None:
            kwargs["class_labels"] = torch.full((x.shape[0],), int(self.class_labels), dtype=torch.long, device=x.device)
        out = self.unet(inp, t.to(x.device), **kwargs).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out  # x0 = x_ve - sigma * eps
        return x / (s**2 + 1) - s / torch.sqrt(s**2 + 1) * out  # x0 = alpha x_vp - sigma_vp v, in VE variables


class DiffusersAutoencoder(nn.Module):
    """AutoencoderKL / AutoencoderTiny: images in [0, 1] <-> latents * scaling_factor (minus shift_factor).

    The factor is the VAE's own (2^(len(block_out_channels) - 1), diffusers' vae_scale_factor): 8 for SD/SDXL,
    4 for the x4 upscaler. Encoding runs without autograd (only conditioning is encoded); the VAE runs in its
    own dtype, latents and images come back in float32 (or the input's dtype).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(vae.config.get("shift_factor", 0.0) or 0.0)
        self.tiny = type(vae).__name__ == "AutoencoderTiny"
        self.latent_channels = int(vae.config.latent_channels)
        blocks = vae.config.get("encoder_block_out_channels") if self.tiny else None
        self.factor = 2 ** (len(blocks or vae.config.block_out_channels) - 1)

    def set_memory(self, slicing: bool = False, tiling: bool = False) -> None:
        """VAE slicing (one image at a time) and tiling (overlapping tiles: large frames in bounded memory)."""
        for flag, on, off in ((slicing, "enable_slicing", "disable_slicing"), (tiling, "enable_tiling", "disable_tiling")):
            fn = getattr(self.vae, on if flag else off, None)
            if fn is not None:
                fn()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/f, W/f) scaled latents (the mode of the posterior for KL)."""
        x = (images * 2 - 1).to(self.vae.dtype)
        if self.tiny:
            z = self.vae.encode(x).latents
        else:
            z = self.vae.encode(x).latent_dist.mode()
        return ((z.float() - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) in [0, 1] (differentiable: pixel-space guidance decodes)."""
        z = (latents / self.scaling_factor + self.shift_factor).to(self.vae.dtype)
        return ((self.vae.decode(z).sample.to(latents.dtype) + 1) / 2).clamp(0, 1)


class LowResAugment(nn.Module):
    """The x4 upscaler's conditioning: the low-res image in [-1, 1] noised to `noise_level` by its
    `low_res_scheduler` (x = sqrt(abar) img + sqrt(1 - abar) n); the UNet is told the level as its class label."""

    def __init__(self, alphas_cumprod: torch.Tensor, noise_level: int = 20, seed: int = 0):
        super().__init__()
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if not 0 <= int(noise_level) < abar.shape[0]:
            raise ValueError(f"noise_level must be in [0, {abar.shape[0] - 1}] (the low-res scheduler's steps), got {noise_level}")
        self.noise_level, self.seed = int(noise_level), int(seed)
        self.register_buffer("abar", abar[self.noise_level].float().reshape(()))

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, h, w) noised; the same noise for the same input (seeded)."""
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(low.shape, generator=gen, dtype=torch.float32).to(low.device, low.dtype)
        a = self.abar.to(low.dtype)
        return a.sqrt() * (low * 2 - 1) + (1 - a).sqrt() * noise


def build_unet(in_channels: int, out_channels: int, block_out_channels=(64, 128, 128), layers_per_block: int = 2,
               attention: bool = True, sample_size: int = 32, norm_num_groups: int = 32):
    """Our small UNet2DModel: down blocks with attention only at the lowest level (GroupNorm, no batch norm)."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                       block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=norm_num_groups,
                       attention_head_dim=32, add_attention=attention)


def pool_mask(mask: torch.Tensor, factor: int, mode: str = "avg") -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, H/f, W/f): fraction of hole pixels ('avg') or SD's 'nearest'."""
    if mode == "avg":
        return F.avg_pool2d(mask, factor)
    if mode == "nearest":
        return F.interpolate(mask, size=(mask.shape[-2] // factor, mask.shape[-1] // factor), mode="nearest")
    raise ValueError(f"mask pooling must be 'avg' or 'nearest', got {mode!r}")


class RestorationModel(nn.Module):
    """Latent autoencoder + conditional denoiser: the one interface the pipeline calls.

    Attributes: task ('sr8' | 'sr4' | 'inpaint' | 'vae'), noise ('gp' | 'white' | None), factor (8), latent_channels,
    sigma_min, sigma_max, card (dict), model_id (str).
    encode(images (B,3,H,W) in [0,1]) -> (B,C,H/8,W/8); decode(latents) -> (B,3,H,W) in [0,1];
    condition(degraded (B,3,H,W) in [0,1] [sr8: bicubic-upsampled low-res frame], mask (B,1,H,W) 1 = hole
    or None) -> cond (B,Cc,H/8,W/8): sr8 encode(degraded); inpaint concat[pooled mask, encode(masked)] (SD
    inpainting's channel order); denoise(x (B,C,h,w), sigma (B,), cond) -> x0_hat (EDM D(x, sigma, cond)).
    With known_replace (our inpaint models), x0_hat in latent cells that hold no hole pixel is the encoded
    known input itself (a hard constraint, still differentiable w.r.t. x in the other cells).
    With known_pixels, condition() also carries the pixel mask and the known pixels (pixel-unshuffled: 4 f^2
    more channels after the UNet's), and every x0_hat is projected onto the known pixels: decode, paste the
    known pixels, re-encode (pixel-space data consistency, as DDNM's range/null split for a mask, brought
    back to the latent). It keeps the known pixels of cells that are only partly a hole, which known_replace
    leaves to the denoiser; it needs a decoder cheap enough to run at every step (our linear PCA one).
    sr4 (the Stable Diffusion x4 upscaler layout): condition(low-res frame (B, 3, H/f, W/f)) is the noise-augmented
    low-res image itself, at latent size (`low_res`, a LowResAugment).
    Text-conditioned models carry a `prompt_encoder` (ops.text.PromptEncoder); `text_denoiser(prompt,
    negative_prompt, cfg)` is D with the encoded prompt (classifier-free guidance when cfg != 1).
    `sigmas(steps)` is the sampling schedule: Karras et al. (Eq. 5) between sigma_min and sigma_max, or
    `schedule(steps)` when the model brings its own (a diffusers scheduler's timesteps in VE form).
    """

    def __init__(self, autoencoder: nn.Module, denoiser: nn.Module | None, task: str, noise: str | None = None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, card: dict | None = None, model_id: str = "",
                 mask_pool: str = "avg", known_replace: bool = False, known_pixels: bool = False,
                 prompt_encoder=None, low_res: nn.Module | None = None, schedule=None):
        super().__init__()
        if task not in ("sr8", "sr4", "inpaint", "vae", "prior"):
            raise ValueError(f"task must be 'sr8', 'sr4', 'inpaint', 'prior' (unconditional) or 'vae', got {task!r}")
        if noise not in ("gp", "white", None):
            raise ValueError(f"noise must be 'gp', 'white' or None, got {noise!r}")
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.task, self.noise = task, noise
        self.factor = int(autoencoder.factor)
        self.latent_channels = int(autoencoder.latent_channels)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.card = dict(card or {})
        self.model_id = model_id
        self.mask_pool = mask_pool
        self.known_replace = bool(known_replace)
        self.known_pixels = bool(known_pixels) and task == "inpaint"
        self.prompt_encoder = prompt_encoder
        self.low_res = low_res
        self.schedule = schedule
        self._text_cache: dict = {}

    def sigmas(self, steps: int) -> torch.Tensor:
        """The (steps + 1,) float64 noise levels to sample with, ending in 0."""
        if self.schedule is not None:
            return self.schedule(steps)
        from .sampling import karras_sigmas

        return karras_sigmas(steps, self.sigma_min, self.sigma_max)

    def refine(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel-space refinement of decoded frames (B, 3, H, W), applied after `decode` and before the data
        consistency (tasks/decode.py): the identity unless the model carries a trained refiner (ops.residual)."""
        return images

    def start(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The latents (B, C, h, w) sampling starts from, x_T = start + sigma_max noise; None: x_T = sigma_max noise
        (the usual full schedule). A residual model overrides it (ops.residual)."""
        return None

    def encode_prompt(self, prompt: str) -> dict:
        """{"hidden": (1, L, D)[, "pooled", "time_ids"]} on the denoiser's device, cached per prompt."""
        if self.prompt_encoder is None:
            raise ValueError(f"model {self.model_id!r} takes no text prompt (it has no text encoder)")
        if prompt not in self._text_cache:
            device = next(self.denoiser.parameters()).device
            self._text_cache[prompt] = {k: v.to(device) for k, v in self.prompt_encoder(prompt).items()}
        return self._text_cache[prompt]

    def text_denoiser(self, prompt: str = "", negative_prompt: str = "", cfg: float = 1.0):
        """D(x, sigma, cond) conditioned on the encoded prompt; with cfg != 1 classifier-free guidance
        D = D(neg) + cfg (D(prompt) - D(neg)) (Ho & Salimans 2022; linear in x0 as in eps since both are affine
        in the network output with the same coefficients), both halves in one batch."""
        if self.prompt_encoder is None:
            if prompt or negative_prompt or cfg != 1.0:
                raise ValueError(f"model {self.model_id!r} has no text encoder: --prompt, --negative-prompt and "
                                 f"--cfg apply to Stable Diffusion layouts only")
            return self.denoise
        pos = self.encode_prompt(prompt)
        if cfg == 1.0:
            return lambda x, sigma, cond=None: self.denoise(x, sigma, cond, text=self._sized(pos, x))
        neg = self.encode_prompt(negative_prompt)

        def guided(x, sigma, cond=None):
            b = x.shape[0]
            p, n = self._sized(pos, x), self._sized(neg, x)
            text = {k: torch.cat([n[k].expand(b, *n[k].shape[1:]), p[k].expand(b, *p[k].shape[1:])]) for k in p}
            sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
            both = self.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                None if cond is None else torch.cat([cond, cond]), text=text)  # (2B, C, h, w)
            uncond, c = both.chunk(2)
            return uncond + cfg * (c - uncond)

        return guided

    def _sized(self, text: dict, x: torch.Tensor) -> dict:
        """SDXL's time ids are the frame's own size: (H, W, crop 0, 0, H, W) with H, W = latent size * factor; a UNet
        trained with the aesthetic score (5 ids, the refiner-style `requires_aesthetics_score`) gets (H, W, 0, 0, 6)."""
        if "time_ids" not in text:
            return text
        h, w = x.shape[-2] * self.factor, x.shape[-1] * self.factor
        ids = [h, w, 0, 0, h, w]
        cfg = self.denoiser.unet.config
        per_id = cfg.get("addition_time_embed_dim") or 0
        if per_id and cfg.get("projection_class_embeddings_input_dim"):
            if (cfg["projection_class_embeddings_input_dim"] - text["pooled"].shape[-1]) // per_id == 5:
                ids = [h, w, 0, 0, 6.0]  # diffusers' default aesthetic_score
        return {**text, "time_ids": torch.tensor([ids], dtype=torch.float32, device=x.device)}  # (1, 6) or (1, 5)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)

    def condition(self, degraded: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.task == "sr8":
            return self.encode(degraded)
        if self.task == "sr4":  # degraded is the low-res frame itself, at latent size
            if self.low_res is None:
                raise ValueError("task 'sr4' (the x4 upscaler layout) needs its low-res augmentation (low_res=LowResAugment)")
            return self.low_res(degraded)  # (B, 3, h, w)
        if self.task == "inpaint":
            if mask is None:
                raise ValueError("inpaint models need a mask (B, 1, H, W) with 1 = hole")
            masked = degraded * (1 - mask) + 0.5 * mask
            cond = torch.cat([pool_mask(mask, self.factor, self.mask_pool), self.encode(masked)], dim=1)  # (B, 1+C, h, w)
            if self.known_pixels:  # + (B, 4 f^2, h, w): the mask and the known pixels, cell by cell
                pixels = F.pixel_unshuffle(torch.cat([mask, degraded * (1 - mask)], dim=1), self.factor)
                cond = torch.cat([cond, pixels.to(cond.dtype)], dim=1)
            return cond
        if self.task == "prior":  # unconditional: the zero-shot solvers (ops.solvers) bring the measurement
            return None
        raise ValueError("a 'vae' model has no denoiser and takes no condition")

    def denoise(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if self.denoiser is None:
            raise ValueError(f"model {self.model_id!r} is an autoencoder only (task 'vae'); it has no denoiser")
        pixels = None
        if self.known_pixels:
            cond, pixels = cond[:, : 1 + self.latent_channels], cond[:, 1 + self.latent_channels :]
        d = self.denoiser(x, sigma, cond, **kwargs)
        if pixels is not None:
            unpacked = F.pixel_shuffle(pixels.to(d.dtype), self.factor)  # (B, 4, H, W): mask, known pixels
            hole, known = unpacked[:, :1], unpacked[:, 1:]
            return self.encode(known + hole * self._decode_linear(d))
        if self.known_replace and self.task == "inpaint":
            # Latent cells without any hole pixel are known exactly: x0_hat there is the encoded input.
            hole = (cond[:, :1] > 0).to(d.dtype)  # (B, 1, h, w)
            d = hole * d + (1 - hole) * cond[:, 1:].to(d.dtype)
        return d

    def _decode_linear(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode without the [0, 1] clamp where the decoder allows it (keeps the projection linear)."""
        if isinstance(self.autoencoder, PCAAutoencoder):
            return self.autoencoder.decode(latents, clamp=False)
        return self.autoencoder.decode(latents)

    def forward(self, x, sigma, cond=None, **kwargs):
        return self.denoise(x, sigma, cond, **kwargs)
