"""Model files: our safetensors + card.json under assets/models/<name>/, local diffusers directories,
and the scikit-image pictures the embedded models are trained on.

`load_model(name_or_dir, device)` -> `ops.denoisers.RestorationModel`:
  * a name resolves to `assets/models/<name>/` (`model.safetensors` + `card.json`, written by `save_model`);
  * a directory with `card.json` is one of ours; a directory with a `unet/` (UNet2DModel or
    UNet2DConditionModel), a `vae/` (AutoencoderKL / AutoencoderTiny) and `scheduler/scheduler_config.json`
    is a diffusers model, wrapped as a VE denoiser. Its layout is detected (`detect_layout`; restoration.json
    {"layout", "task", "noise", ...} overrides): the paper's channel concat (C + C -> sr8, C + 1 + C ->
    inpaint), Stable Diffusion inpainting (9 channels + text encoder), the x4 upscaler (task sr4, low-res
    image at latent size, noise_level class labels, VAE factor 4), SDXL inpainting (added text embeddings and
    time ids). Beta schedule, prediction type and timestep spacing come from the directory's scheduler.
Safetensors only: a pickle (.bin/.pt/.pth/.ckpt/.pkl) that would be loaded is refused with a ValueError naming
it; pickles beside safetensors weights are never read and do not stop the load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ops.autoencoders import PCAAutoencoder
from ops.denoisers import DiffusersAutoencoder, EDMDenoiser, LowResAugment, RestorationModel, VPDenoiser, build_unet

MODELS_ROOT = Path(__file__).resolve().parent.parent / "assets" / "models"
# The defaults: regression + GP-noise residual diffusion on the lapped latent, with the truncated schedule chosen on
# the validation photographs (each card's "schedule"); held-out numbers against the issue-13 goals in assets/README.md.
DEFAULT_MODELS = {"sr8": "sr8-res-gp", "sr4": "sr4-res-gp", "inpaint": "inpaint-res-gp"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHTS = "model.safetensors"
CARD = "card.json"

# scikit-image pictures (no network): trained on TRAIN_IMAGES, evaluated on HELDOUT_IMAGES (split by image).
# motorcycle_left is left out: it is the stereo twin of the held-out motorcycle_right.
TRAIN_IMAGES = ("astronaut", "brick", "camera", "cell", "chelsea", "clock_motion", "coins", "grass", "gravel",
                "hubble_deep_field", "ihc", "moon", "page", "retina", "text")
HELDOUT_IMAGES = ("coffee", "rocket", "motorcycle_right")


# ---------------------------------------------------------------- data
def skimage_image(name: str) -> torch.Tensor:
    """One picture from scikit-image's data directory as (3, H, W) float in [0, 1] (grey -> RGB)."""
    import skimage
    import skimage.io

    data_dir = Path(skimage.__file__).parent / "data"
    files = [f for f in data_dir.iterdir() if f.stem == name and f.suffix in (".png", ".jpg")]
    if not files:
        raise ValueError(f"no picture named {name!r} in {data_dir}")
    a = np.asarray(skimage.io.imread(files[0]))
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1).float() / 255


def eval_views(names=HELDOUT_IMAGES, size: int = 256) -> torch.Tensor:
    """Held-out views (2 per picture): shorter side resized to `size` + centre crop, and a native centre crop."""
    import torch.nn.functional as F

    views = []
    for name in names:
        im = skimage_image(name)[None]
        h, w = im.shape[-2:]
        s = size / min(h, w)
        r = F.interpolate(im, size=(round(h * s), round(w * s)), mode="bicubic", antialias=True).clamp(0, 1)
        for v in (r, im):
            hh, ww = v.shape[-2:]
            views.append(v[:, :, (hh - size) // 2 : (hh - size) // 2 + size, (ww - size) // 2 : (ww - size) // 2 + size])
    return torch.cat(views)  # (2 * len(names), 3, size, size)


# ---------------------------------------------------------------- our models
def _refuse_pickle_file(f: Path) -> None:
    """A pickle checkpoint passed as the model itself is refused (loading a pickle can run code)."""
    if f.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"refusing to load pickle checkpoint {f}: only safetensors are loaded. Convert it "
                         f"to safetensors first (e.g. `safetensors.torch.save_file(torch.load(...), "
                         f"'{f.with_suffix('.safetensors').name}')` on a trusted machine).")


def autoencoder_from_config(cfg: dict):
    if cfg.get("type") == "lapped":
        from ops.lapped import LappedAutoencoder

        return LappedAutoencoder(int(cfg["latent_channels"]), int(cfg.get("factor", 8)))
    if cfg.get("type") != "pca":
        raise ValueError(f"unknown embedded autoencoder type {cfg.get('type')!r} (pca or lapped)")
    return PCAAutoencoder(int(cfg["latent_channels"]), int(cfg.get("factor", 8)))


def build_model(card: dict, model_id: str = "") -> RestorationModel:
    """An untrained RestorationModel of the architecture a card describes."""
    ae = autoencoder_from_config(card["autoencoder"])
    if card.get("kind") == "residual":  # regression + residual diffusion (ops/residual.py)
        from ops.residual import build_residual_model

        return build_residual_model(card, ae, model_id=model_id)
    den = None
    if card["task"] != "vae":
        a = card["denoiser"]
        unet = build_unet(**a["unet"])
        den = EDMDenoiser(unet, sigma_data=a["sigma_data"], time_scale=a["time_scale"])
    return RestorationModel(ae, den, card["task"], card.get("noise"), card.get("sigma_min", 0.002),
                            card.get("sigma_max", 80.0), card=card, model_id=model_id,
                            known_replace=bool(card.get("known_replace", False)),
                            known_pixels=bool(card.get("known_pixels", False)))


def save_model(model: RestorationModel, directory, card: dict) -> Path:
    """Write model.safetensors + card.json (params and weights_sha256 filled in) -> the directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Denoiser (and regressor, refiner) weights are stored in float16 (half the size; loaded back into float32 parameters).
    state = {k: (v.detach().half() if k.startswith(("denoiser.", "regressor.", "refiner.")) and v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    tmp = d / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, d / WEIGHTS)
    card = dict(card)
    card["weights_dtype"] = "float16" if any(v.dtype == torch.float16 for v in state.values()) else "float32"
    card["params"] = int(sum(v.numel() for k, v in state.items() if k.startswith("denoiser.")) or
                         sum(v.numel() for v in state.values()))
    card["weights_sha256"] = hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()
    (d / CARD).write_text(json.dumps(card, indent=2))
    return d


def load_own(directory, device="cpu", dtype="float32") -> RestorationModel:
    """Only model.safetensors and card.json are read (other files beside them are ignored)."""
    from safetensors.torch import load_file

    d = Path(directory)
    card = json.loads((d / CARD).read_text())
    if not (d / WEIGHTS).exists():
        pickles = sorted(f for f in d.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle_file(pickles[0])
        raise ValueError(f"{d} has a card.json but no {WEIGHTS}")
    model = build_model(card, model_id=card.get("name", d.name))
    model.load_state_dict(load_file(str(d / WEIGHTS), device="cpu"))
    model = model.to(resolve_device(device)).eval()
    if model.denoiser is not None and torch_dtype_of(dtype) != torch.float32:
        model.denoiser.unet.to(torch_dtype_of(dtype))  # the linear PCA autoencoder stays float32
    return model


# ---------------------------------------------------------------- diffusers directories
LAYOUTS = ("concat", "sd-inpaint", "sd-upscale", "sdxl-inpaint")
LAYOUT_TASKS = {"sd-inpaint": "inpaint", "sd-upscale": "sr4", "sdxl-inpaint": "inpaint"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MEMORY_DEFAULTS = {"vae_slicing": True, "vae_tiling": False, "attention_slicing": False,
                   "gradient_checkpointing": False, "text_encoder_offload": True}


def _diffusers_class(sub: Path) -> str:
    return json.loads((sub / "config.json").read_text()).get("_class_name", "")


def loaded_weights(sub: Path) -> list[Path]:
    """The weights files `from_pretrained(sub, use_safetensors=True)` reads: its .safetensors (or the shards an
    index names). A component with only pickle weights is refused naming the file; pickles beside safetensors
    are never read, so they are ignored."""
    index = sorted(sub.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text()).get("weight_map", {}).values()))
        return [sub / s for s in shards]
    files = sorted(sub.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(f for f in sub.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"refusing to load pickle checkpoint {pickles[0]}: {sub.name}/ has no .safetensors weights "
                         f"and pickles can run code when loaded; only safetensors are loaded. Convert it first "
                         f"(`diffusers`/`transformers` save_pretrained(..., safe_serialization=True) on a trusted machine).")
    raise ValueError(f"{sub} has no weights (*.safetensors)")


def detect_layout(d: Path, unet_cfg: dict, latent_channels: int, meta: dict) -> str:
    """Which conditioning a diffusers directory uses; restoration.json {"layout": ...} overrides.

    sdxl-inpaint: UNet with addition_embed_type 'text_time' (added text embeddings + time ids), 2C+1 channels;
    sd-upscale: class-embedded UNet (noise_level) taking C + 3 channels (latent + the low-res RGB image);
    sd-inpaint: cross-attention UNet with text_encoder/, 2C+1 channels (latent, mask, masked-image latent);
    concat: everything else (the paper's: latent + encoded degraded frame [+ mask]).
    """
    if meta.get("layout") is not None:
        if meta["layout"] not in LAYOUTS:
            raise ValueError(f"{d / 'restoration.json'}: layout {meta['layout']!r} is not one of {', '.join(LAYOUTS)}")
        return meta["layout"]
    cin, c = int(unet_cfg.get("in_channels", 0)), latent_channels
    if unet_cfg.get("addition_embed_type") == "text_time" and cin == 2 * c + 1:
        return "sdxl-inpaint"
    if unet_cfg.get("num_class_embeds") and cin == c + 3:
        return "sd-upscale"
    if unet_cfg.get("cross_attention_dim") and (d / "text_encoder").is_dir() and cin == 2 * c + 1:
        return "sd-inpaint"
    return "concat"


def scheduler_schedule(scheduler_dir: Path, denoiser: VPDenoiser):
    """steps -> (steps + 1,) float64 VE sigmas at the timesteps the directory's own scheduler would visit
    (its class, beta schedule, timestep_spacing and steps_offset), then 0 (the final, fully denoised step)."""
    import diffusers

    cfg = json.loads((scheduler_dir / "scheduler_config.json").read_text())
    cls = getattr(diffusers, cfg.get("_class_name", ""), None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        cls = diffusers.DDIMScheduler
    sched = cls.from_config(cfg)

    def schedule(steps: int) -> torch.Tensor:
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        sched.set_timesteps(steps)
        t = torch.unique(torch.as_tensor(sched.timesteps, dtype=torch.float64)).flip(0)  # decreasing, no repeats
        sigmas = denoiser.t_to_sigma(t.float()).double()
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    return schedule


def _alphas_cumprod(scheduler_dir: Path) -> tuple[torch.Tensor, dict]:
    """alphas_cumprod (T,) from any diffusers scheduler config (beta_start/end, beta_schedule, trained_betas)."""
    import diffusers

    cfg = json.loads((scheduler_dir / "scheduler_config.json").read_text())
    keep = {k: v for k, v in cfg.items() if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                   "trained_betas", "rescale_betas_zero_snr")}
    sched = diffusers.DDPMScheduler.from_config({**keep, "prediction_type": cfg.get("prediction_type", "epsilon")})
    abar = sched.alphas_cumprod.double()
    if keep.get("rescale_betas_zero_snr"):  # abar[-1] = 0 has sigma = inf: keep the last finite level
        abar = abar.clamp_min(torch.finfo(torch.float32).tiny ** 0.5)
    return abar, cfg


def _text_encoder(d: Path, layout: str, device) -> "PromptEncoder | None":
    if layout not in ("sd-inpaint", "sd-upscale", "sdxl-inpaint"):
        return None
    import transformers

    from ops.text import PromptEncoder

    names = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if layout == "sdxl-inpaint" else [])
    tokenizers, encoders = [], []
    for tok_dir, enc_dir in names:
        for sub in (tok_dir, enc_dir):
            if not (d / sub).is_dir():
                raise ValueError(f"{d} has a {layout} UNet (text-conditioned) but no {sub}/: add the text encoder and "
                                 f"tokenizer of the checkpoint (the prompt is encoded, never replaced by zeros)")
        loaded_weights(d / enc_dir)
        tokenizers.append(transformers.AutoTokenizer.from_pretrained(d / tok_dir))
        arch = json.loads((d / enc_dir / "config.json").read_text()).get("architectures", ["CLIPTextModel"])[0]
        cls = getattr(transformers, arch, transformers.CLIPTextModel)
        encoders.append(cls.from_pretrained(d / enc_dir, use_safetensors=True))
    return PromptEncoder(tokenizers, encoders, sdxl=layout == "sdxl-inpaint", device=device)


def load_diffusers(directory, device="cpu", task: str | None = None, noise: str | None = None,
                   encoder_hidden_states: torch.Tensor | None = None, dtype="float32",
                   memory: dict | None = None) -> RestorationModel:
    """A local diffusers directory (unet/, vae/, scheduler/ [+ text_encoder/, tokenizer/, low_res_scheduler/])
    -> RestorationModel (VP -> VE wrapped), on `device` with the UNet and VAE in `dtype`.

    restoration.json (optional): {"layout", "task", "noise", "noise_level" (sd-upscale, default 20), "sigmas":
    "scheduler" (default: the directory scheduler's timesteps) | "karras", "memory": {...MEMORY_DEFAULTS}}.
    """
    import diffusers

    d = Path(directory)
    for sub in ("unet", "vae", "scheduler"):
        if not (d / sub).is_dir():
            raise ValueError(f"{d} is not a diffusers model directory: no {sub}/ subfolder")
    unet_cls = _diffusers_class(d / "unet")
    vae_cls = _diffusers_class(d / "vae")
    if unet_cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"unsupported UNet class {unet_cls!r} in {d / 'unet'} (UNet2DModel / UNet2DConditionModel)")
    if vae_cls not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ValueError(f"unsupported autoencoder class {vae_cls!r} in {d / 'vae'} (AutoencoderKL / AutoencoderTiny)")
    for sub in ("unet", "vae"):
        loaded_weights(d / sub)
    torch_dtype = torch_dtype_of(dtype)
    meta = json.loads((d / "restoration.json").read_text()) if (d / "restoration.json").exists() else {}
    mem = {**MEMORY_DEFAULTS, **meta.get("memory", {}), **(memory or {})}
    unknown = set(mem) - set(MEMORY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown memory options {sorted(unknown)}; known: {', '.join(MEMORY_DEFAULTS)}")
    unet = getattr(diffusers, unet_cls).from_pretrained(d / "unet", use_safetensors=True, torch_dtype=torch_dtype)
    vae = getattr(diffusers, vae_cls).from_pretrained(d / "vae", use_safetensors=True, torch_dtype=torch_dtype)
    abar, sched_cfg = _alphas_cumprod(d / "scheduler")
    prediction = sched_cfg.get("prediction_type", "epsilon")
    ae = DiffusersAutoencoder(vae)
    ae.set_memory(slicing=mem["vae_slicing"], tiling=mem["vae_tiling"])
    if mem["attention_slicing"] and hasattr(unet, "set_attention_slice"):
        unet.set_attention_slice("auto")
    if mem["gradient_checkpointing"] and getattr(unet, "_supports_gradient_checkpointing", False):
        unet.enable_gradient_checkpointing()  # guided steps: recompute activations in the backward pass
    c = ae.latent_channels
    layout = detect_layout(d, dict(unet.config), c, meta)
    if task is None:
        task = meta.get("task") or LAYOUT_TASKS.get(layout) or {2 * c: "sr8", 2 * c + 1: "inpaint"}.get(unet.config.in_channels)
        if task is None:
            raise ValueError(f"cannot tell the task of {d}: the UNet takes {unet.config.in_channels} channels for a "
                             f"{c}-channel latent (sr8 needs {2 * c}, inpaint {2 * c + 1}, the x4 upscaler {c + 3} "
                             f"with class labels); add restoration.json")
    low_res, class_labels = None, None
    if layout == "sd-upscale":
        if ae.factor != 4:
            raise ValueError(f"{d}: an x4 upscaler needs a VAE of factor 4 (the low-res image is concatenated at "
                             f"latent size); this VAE's factor is {ae.factor}")
        lr_dir = d / "low_res_scheduler"
        lr_abar = _alphas_cumprod(lr_dir)[0] if lr_dir.is_dir() else _alphas_cumprod(d / "scheduler")[0]
        noise_level = int(meta.get("noise_level", 20))
        low_res = LowResAugment(lr_abar, noise_level)
        class_labels = noise_level
    den = VPDenoiser(unet, abar, prediction, encoder_hidden_states, class_labels=class_labels)
    if meta.get("sigmas", "scheduler") not in ("scheduler", "karras"):
        raise ValueError(f"{d / 'restoration.json'}: sigmas must be 'scheduler' or 'karras', got {meta['sigmas']!r}")
    schedule = scheduler_schedule(d / "scheduler", den) if meta.get("sigmas", "scheduler") == "scheduler" else None
    device = resolve_device(device)
    text_device = "cpu" if mem["text_encoder_offload"] else device
    prompt_encoder = _text_encoder(d, layout, text_device) if encoder_hidden_states is None else None
    card = {"name": d.name, "task": task, "noise": noise or meta.get("noise"), "source": str(d), "layout": layout,
            "unet_class": unet_cls, "vae_class": vae_cls, "prediction_type": prediction,
            "scheduler": sched_cfg.get("_class_name"), "vae_factor": ae.factor, "dtype": str(dtype), "memory": mem}
    model = RestorationModel(ae, den, task, noise or meta.get("noise"), den.sigma_min, den.sigma_max, card=card,
                             model_id=f"diffusers:{d.resolve()}", mask_pool="nearest", prompt_encoder=prompt_encoder,
                             low_res=low_res, schedule=schedule)
    return model.to(device).eval()


def torch_dtype_of(dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype, with a clear error otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cpu', 'cuda', 'cuda:N', 'meta' are checked."""
    import re

    device = str(device or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cpu", "meta"):
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                             f"use --device cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


# ---------------------------------------------------------------- public entry points
def resolve(name_or_dir: str, root=None) -> Path:
    """A model name under `root` (assets/models) or a path -> its directory (or file)."""
    root = Path(root) if root is not None else MODELS_ROOT
    name_or_dir = DEFAULT_MODELS.get(name_or_dir, name_or_dir)
    p = Path(name_or_dir).expanduser()
    if (root / name_or_dir).is_dir() and "/" not in name_or_dir:
        return root / name_or_dir
    if p.exists():
        return p
    known = ", ".join(sorted(list_models(root))) or "none"
    raise ValueError(f"unknown model {name_or_dir!r}: not a directory, and not one of the models in {root} ({known})")


def load_model(name_or_dir: str, device="cpu", dtype="float32", **kwargs) -> RestorationModel:
    """Load a model by name (assets/models/<name>, or a task 'sr8' / 'inpaint' for its default) or directory.

    Returns a RestorationModel in eval mode on `device` ('auto' | 'cpu' | 'cuda' | 'cuda:N'), its networks in
    `dtype` ('float32' | 'float16' | 'bfloat16'). kwargs (task, noise, encoder_hidden_states, memory) are
    passed to diffusers directories. Pickle checkpoints that would be loaded raise ValueError naming the file.
    """
    torch_dtype_of(dtype)
    p = resolve(str(name_or_dir))
    if p.is_file():
        _refuse_pickle_file(p)
        raise ValueError(f"{p} is a file; pass a model directory (model.safetensors + card.json, or a diffusers directory)")
    if (p / CARD).exists():
        return load_own(p, device, dtype)
    return load_diffusers(p, device, dtype=dtype, **kwargs)


BEHAVIOUR_KEYS = ("known_pixels",)


def model_identity(name_or_dir: str) -> dict:
    """What identifies a model's weights in cache keys, read from its files without loading it.

    Our models: name + the weights' sha256 that `save_model` records in the card. Diffusers directories: the
    resolved path + (size, mtime) of every weights and config file (hashing multi-GB checkpoints on every run
    would cost more than the cached stages save), so replacing their weights in place changes the identity.
    """
    p = resolve(str(name_or_dir))
    if (p / CARD).exists():
        card = json.loads((p / CARD).read_text())
        ident = {"model_id": card.get("name", p.name),
                 "weights": card.get("weights_sha256") or card.get("git_commit") or card.get("steps")}
        behaviour = {k: card[k] for k in BEHAVIOUR_KEYS if card.get(k)}  # card switches that change outputs
        return {**ident, "behaviour": behaviour} if behaviour else ident
    files = {}
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json"):
            st = f.stat()
            files[str(f.relative_to(p))] = [st.st_size, st.st_mtime_ns]
    return {"model_id": f"diffusers:{p.resolve()}", "files": files}


def list_models(root=None) -> dict:
    """{name: {"task", "noise", "params", "eval"}} for every model directory with a card under root."""
    root = Path(root) if root is not None else MODELS_ROOT
    out = {}
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if (d / CARD).exists() and (d / WEIGHTS).exists():
            card = json.loads((d / CARD).read_text())
            out[d.name] = {"task": card.get("task"), "noise": card.get("noise"), "params": card.get("params"),
                           "eval": card.get("eval", {})}
    return out
