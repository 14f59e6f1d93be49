"""Model loading shared by the stages: one instance per (name, device, dtype) per process."""

from __future__ import annotations

import json
import threading
from functools import lru_cache

from ops.autoencoders import PCAAutoencoder
from storage.models import CARD, resolve
from storage.models import model_identity  # noqa: F401  (cache keys read files only: no model is loaded)

_LOAD_LOCK = threading.Lock()


def get_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """The loaded model on `device` (auto | cpu | cuda | cuda:N) in `dtype` (float32 | float16 | bfloat16), once
    per process even when several threads (restore-archive) ask at once.

    The lock also keeps diffusers' lazy module imports single-threaded: two threads importing
    `diffusers.UNet2DModel` at the same moment can see a half-initialised module (ImportError).
    """
    from storage.models import resolve_device

    with _LOAD_LOCK:
        return _load(name, resolve_device(device), str(dtype))


@lru_cache(maxsize=4)
def _load(name: str, device: str, dtype: str):
    from storage.models import load_model

    model = load_model(name, device=device, dtype=dtype)
    for p in model.parameters() if hasattr(model, "parameters") else []:
        p.requires_grad_(False)
    return model


def model_info(name: str) -> dict:
    """{"task", "noise", "latent_channels", "factor", "downsampling", "multiple", "layout", "text", "linear_decoder"}
    of a model, read from its files without loading it (our card; a diffusers directory's configs; the geometry from
    `model_geometry`). linear_decoder: decoding is one cheap linear map (our PCA and lapped autoencoders); text: the
    model takes a prompt."""
    from storage.models import LAYOUT_TASKS, detect_layout

    d = resolve(name)
    if (d / CARD).exists():
        card = json.loads((d / CARD).read_text())
        return {"task": card["task"], "noise": card.get("noise"), "latent_channels": int(card["autoencoder"]["latent_channels"]),
                **model_geometry(name), "layout": "concat", "text": False,
                "linear_decoder": card["autoencoder"].get("type") in ("pca", "lapped")}  # both decode linearly
    try:
        unet = json.loads((d / "unet" / "config.json").read_text())
        vae = json.loads((d / "vae" / "config.json").read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"{d} is not a diffusers model directory: {exc.filename} is missing") from None
    meta = json.loads((d / "restoration.json").read_text()) if (d / "restoration.json").exists() else {}
    c = int(vae.get("latent_channels", 4))
    layout = detect_layout(d, unet, c, meta)
    task = meta.get("task") or LAYOUT_TASKS.get(layout) or {2 * c: "sr8", 2 * c + 1: "inpaint"}.get(int(unet.get("in_channels", 0)))
    if task is None:
        return {**_loaded_info(name), **model_geometry(name), "layout": layout}
    return {"task": task, "noise": meta.get("noise"), "latent_channels": c, **model_geometry(name),
            "layout": layout, "text": layout != "concat", "linear_decoder": False}


def _loaded_info(name: str) -> dict:
    model = get_model(name)  # raises the loader's own error (which channels it expected)
    return {"task": model.task, "noise": model.noise, "latent_channels": model.latent_channels, "factor": model.factor,
            "text": model.prompt_encoder is not None, "linear_decoder": isinstance(model.autoencoder, PCAAutoencoder)}


def resolve_guidance_space(space: str, info: dict) -> str:
    """'auto' -> 'pixel' for super-resolution with a linear decoder, else 'latent' (the paper's).

    Measured (EXPERIMENTS.md): on the sample clip's sub-cell motion, pixel-space guidance is what makes decoded
    frames agree (latent guidance raised the pixel warping error). Inpainting pins most of the frame, the
    mismatch lives in the hole, and the fixed-size normalised step (lambda grad e / sqrt(e)) overshoots in
    pixel space: shift-inpaint's first-frame error is 2.7e-6 with latent guidance, 2.6e-3 with pixel guidance.
    A diffusers decoder is too costly to run inside every guided step.
    """
    if space not in ("auto", "pixel", "latent"):
        raise ValueError(f"guidance_space must be auto, pixel or latent, got {space!r}")
    if space == "auto":
        return "pixel" if info.get("linear_decoder") and info.get("task") == "sr8" else "latent"
    return space


def model_geometry(name: str) -> dict:
    """{"factor", "downsampling", "multiple"} of a model, read from its card or config json without loading weights.

    factor: the autoencoder's latent factor (pixels per latent cell); downsampling: the denoiser's total
    downsampling of the latent (2^(levels - 1) for a UNet whose every block but the last halves the size);
    multiple = factor x downsampling: frame sizes must be multiples of it (a 3-level UNet at f=8 needs 32 px).
    """
    p = resolve(name)
    card_path = p / CARD
    if card_path.exists():
        card = json.loads(card_path.read_text())
        from ops.autoencoders import FACTOR as PCA_FACTOR  # the PCA autoencoder's own default, when a card omits it

        factor = int(card["autoencoder"].get("factor", PCA_FACTOR))
        unet = (card.get("denoiser") or card.get("residual") or {}).get("unet")  # residual: ops/residual.py
        levels = len(unet["block_out_channels"]) if unet else 1
        downsampling = 2 ** (levels - 1)
    else:
        vae = _config(p / "vae")
        blocks = vae.get("encoder_block_out_channels") if vae.get("_class_name") == "AutoencoderTiny" else None
        factor = 2 ** (len(blocks or vae["block_out_channels"]) - 1)
        unet = _config(p / "unet")
        downsampling = 2 ** (len(unet.get("down_block_types") or unet["block_out_channels"]) - 1)
    return {"factor": factor, "downsampling": downsampling, "multiple": factor * downsampling}


def _config(directory) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise ValueError(f"{directory}: no config.json; a diffusers model directory needs unet/ and vae/ configs")
    return json.loads(path.read_text())


def latent_factor(model_name: str) -> int:
    """Pixels per latent cell of a model's autoencoder (8 for SD/SDXL and the embedded PCA autoencoder)."""
    return model_geometry(model_name)["factor"]


def pad_multiple(model_name: str) -> int:
    """Frame sizes a model accepts are multiples of this: latent factor x the denoiser's total downsampling."""
    return model_geometry(model_name)["multiple"]
