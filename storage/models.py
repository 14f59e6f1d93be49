"""Model files: our safetensors + card.json under assets/models/<name>/, local diffusers directories,
and the scikit-image pictures the embedded models are trained on.

`load_model(name_or_dir, device)` -> `ops.denoisers.RestorationModel`:
  * a name resolves to `assets/models/<name>/` (`model.safetensors` + `card.json`, written by `save_model`);
  * a directory with `card.json` is one of ours; a directory with a `unet/` (UNet2DModel or
    UNet2DConditionModel), a `vae/` (AutoencoderKL / AutoencoderTiny) and `scheduler/scheduler_config.json`
    is a diffusers model (epsilon or v prediction), wrapped as a VE denoiser with channel-concat conditioning
    (task from the UNet's input channels: C + C -> sr8, C + 1 + C -> inpaint; or `restoration.json`
    {"task": ..., "noise": ...} in the directory).
Safetensors only: pickle checkpoints (.bin/.pt/.pth/.ckpt/.pkl) are refused with a ValueError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ops.autoencoders import PCAAutoencoder
from ops.denoisers import DiffusersAutoencoder, EDMDenoiser, RestorationModel, VPDenoiser, build_unet

MODELS_ROOT = Path(__file__).resolve().parent.parent / "assets" / "models"
DEFAULT_MODELS = {"sr8": "sr8-gp", "inpaint": "inpaint-gp"}
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
def _refuse_pickles(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
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
    # Denoiser (and regressor) weights are stored in float16 (half the size; loaded back into float32 parameters).
    state = {k: (v.detach().half() if k.startswith(("denoiser.", "regressor.")) and v.is_floating_point() else v.detach()).contiguous().cpu()
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


def load_own(directory, device="cpu") -> RestorationModel:
    from safetensors.torch import load_file

    d = Path(directory)
    _refuse_pickles(d)
    card = json.loads((d / CARD).read_text())
    if not (d / WEIGHTS).exists():
        raise ValueError(f"{d} has a card.json but no {WEIGHTS}")
    model = build_model(card, model_id=card.get("name", d.name))
    model.load_state_dict(load_file(str(d / WEIGHTS), device="cpu"))
    return model.to(device).eval()


# ---------------------------------------------------------------- diffusers directories
def _diffusers_class(sub: Path) -> str:
    return json.loads((sub / "config.json").read_text()).get("_class_name", "")


def load_diffusers(directory, device="cpu", task: str | None = None, noise: str | None = None,
                   encoder_hidden_states: torch.Tensor | None = None) -> RestorationModel:
    """A local diffusers directory (unet/, vae/, scheduler/) -> RestorationModel (VP -> VE wrapped)."""
    import diffusers

    d = Path(directory)
    _refuse_pickles(d)
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
        if not list((d / sub).glob("*.safetensors")):
            raise ValueError(f"{d / sub} has no .safetensors weights (pickle checkpoints are not loaded)")
    unet = getattr(diffusers, unet_cls).from_pretrained(d / "unet", use_safetensors=True)
    vae = getattr(diffusers, vae_cls).from_pretrained(d / "vae", use_safetensors=True)
    sched = diffusers.DDPMScheduler.from_pretrained(d / "scheduler")
    ae = DiffusersAutoencoder(vae)
    meta = json.loads((d / "restoration.json").read_text()) if (d / "restoration.json").exists() else {}
    c = ae.latent_channels
    if task is None:
        task = meta.get("task") or {2 * c: "sr8", 2 * c + 1: "inpaint"}.get(unet.config.in_channels)
        if task is None:
            raise ValueError(f"cannot tell the task of {d}: the UNet takes {unet.config.in_channels} channels for a "
                             f"{c}-channel latent (sr8 needs {2 * c}, inpaint {2 * c + 1}); add restoration.json")
    den = VPDenoiser(unet, sched.alphas_cumprod, sched.config.prediction_type, encoder_hidden_states)
    card = {"name": d.name, "task": task, "noise": noise or meta.get("noise"), "source": str(d),
            "unet_class": unet_cls, "vae_class": vae_cls, "prediction_type": sched.config.prediction_type}
    model = RestorationModel(ae, den, task, noise or meta.get("noise"), den.sigma_min, den.sigma_max, card=card,
                             model_id=f"diffusers:{d.resolve()}", mask_pool="nearest")
    return model.to(device).eval()


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


def load_model(name_or_dir: str, device="cpu", **kwargs) -> RestorationModel:
    """Load a model by name (assets/models/<name>, or a task 'sr8' / 'inpaint' for its default) or directory.

    Returns a RestorationModel in eval mode on `device`. kwargs (task, noise, encoder_hidden_states) are
    passed to diffusers directories. Pickle checkpoints raise ValueError.
    """
    p = resolve(str(name_or_dir))
    if p.is_file():
        _refuse_pickles(p)
        raise ValueError(f"{p} is a file; pass a model directory (model.safetensors + card.json, or a diffusers directory)")
    if (p / CARD).exists():
        return load_own(p, device)
    return load_diffusers(p, device, **kwargs)


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
