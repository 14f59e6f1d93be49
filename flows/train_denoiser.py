"""train-denoiser: fit the embedded PCA autoencoder and train the sr8 / inpaint denoisers (GP and white noise).

    restore-video train [--task sr8|inpaint|vae|all] [--noise gp|white|both] [--steps N] [--batch B] [--crop 128]
                        [--seed S] [--device cpu|cuda] [--out assets/models] [--resume] [--eval-only]

Models land in <out>/<name>/ (model.safetensors + card.json); names: vae-pca, sr8-gp, sr8-white, inpaint-gp,
inpaint-white. Checkpoints (weights, EMA, optimizer state, RNG states; safetensors + json) go to --ckpt-dir,
so `--resume` continues a run bit-for-bit. Data: crops, flips and rescales of scikit-image's pictures
(storage.models.TRAIN_IMAGES); evaluation on the held-out pictures at 256x256 (storage.models.eval_views).
Loss curves and sample grids go to MLflow (MLFLOW_TRACKING_URI or sqlite:///<out>/../mlflow.db) when MLflow is
installed; Prefect is optional too, so the same file trains on a bare GPU box.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

try:
    from prefect import flow
except ImportError:  # bare training machines: the flow is then a plain function
    def flow(*args, **kwargs):
        return (lambda fn: fn) if not args or not callable(args[0]) else args[0]

from ops.autoencoders import fit_pca_autoencoder, image_patches
from ops.denoisers import RestorationModel
from ops.training import degrade_batch, edm_loss, evaluate, make_noise, psnr, random_crops
from infra.tracking import git_commit
from storage import models as store

ROOT = Path(__file__).resolve().parent.parent
VAE_NAME = "vae-pca"
LATENT_CHANNELS = 32
UNET = {"block_out_channels": [64, 96, 128], "layers_per_block": 1, "attention": True}
SIGMA_DATA, TIME_SCALE = 1.0, 250.0
# The unconditional prior leaves out astronaut too: the demo clip and the test clips (tests/_clips.py) pan over it.
PRIOR_EXCLUDED = ("astronaut",)
PRIOR_EVAL_SIGMAS = (0.1, 0.5, 1.0, 2.0)  # latent sigmas of the held-out denoising PSNR (sigma_data = 1)


def _mlflow(out: Path):
    """mlflow module with the tracking URI set (infra.tracking's: MLFLOW_TRACKING_URI, else sqlite next to `out`) and
    the train-denoiser experiment active, or None when MLflow is not installed."""
    try:
        import mlflow
    except ImportError:
        return None
    from infra import tracking

    uri = tracking.tracking_uri(Path(out).resolve().parent)
    tracking.use_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment("train-denoiser", uri))
    return mlflow


def _images(names, device) -> list[torch.Tensor]:
    return [store.skimage_image(n).to(device) for n in names]


def _grid(images: torch.Tensor, path: Path) -> Path:
    """Rows of images (R, N, 3, H, W) -> one PNG."""
    import numpy as np
    from PIL import Image

    r, n, c, h, w = images.shape
    grid = images.permute(0, 3, 1, 4, 2).reshape(r * h, n * w, c).clamp(0, 1).cpu().numpy()
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- autoencoder
def fit_vae(out: Path, seed: int = 0, latent_channels: int = LATENT_CHANNELS) -> RestorationModel:
    """PCA of 8x8 patches of the training pictures at scales 1, 3/4, 1/2 (offsets 0 and 4) -> <out>/vae-pca."""
    import torch.nn.functional as F

    t0 = time.time()
    patches = []
    for img in _images(store.TRAIN_IMAGES, "cpu"):
        for s in (1.0, 0.75, 0.5):
            x = img[None] if s == 1 else F.interpolate(img[None], scale_factor=s, mode="bicubic", antialias=True).clamp(0, 1)
            for off in (0, 4):
                patches.append(image_patches(x[:, :, off:, off:]))
    ae = fit_pca_autoencoder(torch.cat(patches), latent_channels)
    card = {"name": VAE_NAME, "task": "vae", "noise": None, "autoencoder": ae.config(),
            "data": {"source": "skimage.data", "train": list(store.TRAIN_IMAGES), "heldout": list(store.HELDOUT_IMAGES),
                     "patches": int(sum(p.shape[0] for p in patches))},
            "seed": seed, "steps": 0, "wall_time_s": round(time.time() - t0, 2), "device": "cpu", "git_commit": git_commit(ROOT)}
    model = RestorationModel(ae, None, "vae", None, card=card, model_id=VAE_NAME)
    card["eval"], _ = evaluate(model, store.eval_views())
    store.save_model(model, out / VAE_NAME, card)
    return store.load_own(out / VAE_NAME)


def _vae(out: Path, seed: int) -> RestorationModel:
    return store.load_own(out / VAE_NAME) if (out / VAE_NAME / store.CARD).exists() else fit_vae(out, seed)


# ---------------------------------------------------------------- denoisers
def _new_card(task: str, noise: str, vae: RestorationModel, args: dict) -> dict:
    c = vae.latent_channels
    cond = {"sr8": c, "inpaint": c + 1, "prior": 0}[task]
    return {"name": f"{task}-{noise}", "task": task, "noise": noise, "autoencoder": vae.autoencoder.config(),
            "denoiser": {"type": "edm-unet2d", "sigma_data": SIGMA_DATA, "time_scale": TIME_SCALE,
                         "cond_channels": cond,
                         "unet": {"in_channels": c + cond, "out_channels": c, **UNET}},
            "sigma_min": 0.002, "sigma_max": 80.0, "known_replace": task == "inpaint",
            "known_pixels": False,  # opt-in: see RestorationModel (better known_psnr, worse shift-inpaint consistency)
            "conditioning": {"sr8": "encode(bicubic x8 upsampling of the antialiased bicubic x8 downsampling)",
                             "inpaint": "concat[avg-pooled mask (1 = hole), encode(image with holes = 0.5)]",
                             "prior": "none (unconditional prior for the zero-shot solvers, ops.solvers)"}[task],
            "training": {k: args[k] for k in ("steps", "batch", "crop", "lr", "ema", "p_mean", "p_std", "seed")},
            "data": {"source": "skimage.data", "train": list(train_images(task)), "heldout": list(store.HELDOUT_IMAGES),
                     "augment": "random crops, rescale s~U(0.5,1) antialiased bicubic, horizontal flips"},
            "seed": args["seed"]}


def train_images(task: str) -> tuple[str, ...]:
    """The training pictures of a task: every TRAIN_IMAGES one; the prior leaves out PRIOR_EXCLUDED."""
    return tuple(n for n in store.TRAIN_IMAGES if task != "prior" or n not in PRIOR_EXCLUDED)


@torch.no_grad()
def evaluate_prior(model, views: torch.Tensor, seed: int = 0, sigmas=PRIOR_EVAL_SIGMAS) -> tuple[dict, torch.Tensor]:
    """Held-out one-step denoising of an unconditional prior: x = encode(view) + sigma n (the model's noise kind),
    PSNR of decode(D(x, sigma)) and of decode(x) against the view, per latent sigma; + the autoencoder's ceiling."""
    x0 = model.encode(views)  # (N, C, h, w)
    res = {"views": int(views.shape[0]), "vae_psnr": float(psnr(model.decode(x0), views).mean())}
    outs = []
    for s in sigmas:
        n = make_noise(model.noise, torch.Generator().manual_seed(seed), x0.shape).to(x0)
        sigma = torch.full((x0.shape[0],), float(s), device=x0.device)
        out = model.decode(model.denoise(x0 + s * n, sigma))
        res[f"denoise_psnr_s{s:g}"] = float(psnr(out, views).mean())
        res[f"noisy_psnr_s{s:g}"] = float(psnr(model.decode(x0 + s * n), views).mean())
        outs.append(out)
    return res, torch.stack(outs)  # (S, N, 3, H, W)


def _save_ckpt(ckpt: Path, model, ema, opt, step, g_cpu, g_dev, losses, wall) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.cpu"] = g_cpu.get_state()
    tensors["rng.dev"] = g_dev.get_state()
    save_file({k: v.cpu() for k, v in tensors.items()}, str(ckpt / "state.safetensors.tmp"))
    os.replace(ckpt / "state.safetensors.tmp", ckpt / "state.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": step, "param_groups": sd["param_groups"], "losses": losses, "wall_time_s": wall}))


def _load_ckpt(ckpt: Path, model, ema, opt, g_cpu, g_dev, device):
    from safetensors.torch import load_file

    t = load_file(str(ckpt / "state.safetensors"))
    meta = json.loads((ckpt / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    state = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v.to(device) if name != "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    g_cpu.set_state(t["rng.cpu"])
    g_dev.set_state(t["rng.dev"])
    return meta["step"], meta["losses"], meta["wall_time_s"]


def train_one(task: str, noise: str, out: Path, steps: int = 2000, batch: int = 16, crop: int = 128, seed: int = 0,
              device: str = "cpu", resume: bool = False, lr: float = 2e-4, ema_decay: float = 0.9995,
              p_mean: float = -1.2, p_std: float = 1.2, ckpt_dir: Path | None = None, ckpt_every: int = 1000,
              log_every: int = 50, time_limit: float | None = None, eval_steps: int = 32, progress: bool = True,
              init: Path | None = None) -> dict:
    """Train one conditional denoiser; save <out>/<task>-<noise>/ with the EMA weights and its evaluated card.

    `init`: a saved model directory (same task, same architecture; its noise may differ) whose fp16 denoiser
    weights start the run in float32 -- fine-tuning, e.g. a white-noise model from the GP one.
    """
    from tqdm import tqdm

    name = f"{task}-{noise}"
    out = Path(out)
    ckpt = Path(ckpt_dir or ROOT / ".cache" / "train-denoiser") / name
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae = _vae(out, seed)
    args = dict(steps=steps, batch=batch, crop=crop, lr=lr, ema=ema_decay, p_mean=p_mean, p_std=p_std, seed=seed)
    card = _new_card(task, noise, vae, args)
    model = store.build_model(card, model_id=name)
    model.autoencoder.load_state_dict(vae.autoencoder.state_dict())
    if init is not None:
        src = store.load_own(init)
        if src.task != task or src.card["denoiser"] != card["denoiser"]:
            raise ValueError(f"--init {init}: task/denoiser config differ from {name}")
        model.denoiser.load_state_dict({k: v.float() for k, v in src.denoiser.state_dict().items()})
        card["training"]["init"] = {"from": src.card.get("name", Path(init).name), "steps": src.card.get("steps"),
                                    "weights_sha256": src.card.get("weights_sha256")}
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=lr)
    g_cpu = torch.Generator().manual_seed(seed)
    g_dev = torch.Generator(device=device).manual_seed(seed + 1)
    step, losses, wall0 = 0, [], 0.0
    if resume and (ckpt / "state.json").exists():
        step, losses, wall0 = _load_ckpt(ckpt, model, ema, opt, g_cpu, g_dev, device)
    images = _images(train_images(task), device)
    ml = _mlflow(out)
    run = ml.start_run(run_name=f"train-{name}") if ml else None
    if ml:
        ml.log_params({"task": task, "noise": noise, **args, "device": device})
    t0 = time.time()
    model.train()
    bar = tqdm(total=steps, initial=step, desc=name, disable=not progress, mininterval=5)
    while step < steps and not (time_limit and wall0 + time.time() - t0 > time_limit):
        # 1. data: crops -> degraded input -> latents and condition.
        x = random_crops(g_cpu, images, batch, crop)  # (B, 3, crop, crop)
        degraded, mask = (x, None) if task == "prior" else degrade_batch(task, x, g_cpu)
        with torch.no_grad():
            x0 = model.encode(x)  # (B, C, crop/8, crop/8)
            cond = model.condition(degraded, mask)  # (B, Cc, crop/8, crop/8)
        # 2. EDM loss with GP or white noise.
        n = make_noise(noise, g_dev, x0.shape, device=device)
        # lr: 200-step warm-up, then cosine to 5% over the run (its steps, or its time limit when one is set).
        frac = min(1.0, (wall0 + time.time() - t0) / time_limit) if time_limit else step / max(steps, 1)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = edm_loss(model, x0, cond, n, g_dev, SIGMA_DATA, p_mean, p_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.denoiser.parameters(), 1.0)
        opt.step()
        # 3. EMA of the weights.
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.denoiser.parameters(), model.denoiser.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        bar.update(1)
        if step % log_every == 0:
            lv = float(loss)
            losses.append([step, lv])
            bar.set_postfix(loss=f"{lv:.4f}")
            if ml:
                ml.log_metric("loss", lv, step=step)
        if step % ckpt_every == 0:
            _save_ckpt(ckpt, model, ema, opt, step, g_cpu, g_dev, losses, wall0 + time.time() - t0)
    bar.close()
    wall = wall0 + time.time() - t0
    _save_ckpt(ckpt, model, ema, opt, step, g_cpu, g_dev, losses, wall)
    card.update(steps=step, wall_time_s=round(wall, 1), device=str(torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"),
                git_commit=git_commit(ROOT), loss_curve=losses[:: max(1, len(losses) // 200)])
    card["training"]["steps"] = step
    ema.card = card
    store.save_model(ema.cpu(), out / name, card)
    result = eval_model(out / name, device=device, steps=eval_steps, mlflow_module=ml, samples_dir=ckpt)
    if ml:
        ml.end_run()
    return result


def eval_model(directory: Path, device: str = "cpu", steps: int = 32, mlflow_module=None, samples_dir=None) -> dict:
    """Evaluate a saved model on the held-out views, store the numbers in its card's "eval", save a sample grid."""
    directory = Path(directory)
    model = store.load_own(directory, device)
    views = store.eval_views().to(device)
    if model.task == "prior":
        res, out = evaluate_prior(model, views)
    else:
        mismatch = None if model.task == "vae" else {"gp": "white", "white": "gp"}[model.noise]
        res, out = evaluate(model, views, seed=0, steps=steps, mismatch=mismatch)
    card = json.loads((directory / store.CARD).read_text())
    card["eval"] = {**res, "heldout": list(store.HELDOUT_IMAGES), "size": 256}
    if model.task == "prior":
        card["data"]["train"] = list(train_images("prior"))
    (directory / store.CARD).write_text(json.dumps(card, indent=2))
    if model.task == "prior":
        grid_dir = Path(samples_dir or ROOT / ".cache" / "train-denoiser" / directory.name)
        grid_dir.mkdir(parents=True, exist_ok=True)
        grid = _grid(torch.cat([views.cpu()[None], out.cpu()]), grid_dir / "denoised.png")
        if mlflow_module:
            mlflow_module.log_artifact(str(grid))
    elif model.task != "vae":
        g = torch.Generator().manual_seed(0)
        degraded, mask = degrade_batch(model.task, views.cpu(), g)
        grid_dir = Path(samples_dir or ROOT / ".cache" / "train-denoiser" / directory.name)
        grid_dir.mkdir(parents=True, exist_ok=True)
        grid = _grid(torch.stack([views.cpu(), degraded, out.cpu()]), grid_dir / "samples.png")
        if mlflow_module:
            mlflow_module.log_artifact(str(grid))
    if mlflow_module:
        mlflow_module.log_metrics({f"eval_{k}": v for k, v in res.items() if isinstance(v, (int, float))})
    return {directory.name: card["eval"]}


def _eval_logged(directory: Path, device: str, steps: int) -> dict:
    """eval_model inside an MLflow run that also carries the card's training loss curve and the sample grid."""
    ml = _mlflow(directory.parent)
    if ml is None:
        return eval_model(directory, device=device, steps=steps)
    card = json.loads((directory / store.CARD).read_text())
    with ml.start_run(run_name=f"eval-{directory.name}"):
        ml.log_params({"model": directory.name, "task": card.get("task"), "noise": card.get("noise"),
                       "train_steps": card.get("steps"), "train_device": card.get("device"), "eval_steps": steps})
        for step, loss in card.get("loss_curve", []):
            ml.log_metric("loss", loss, step=int(step))
        return eval_model(directory, device=device, steps=steps, mlflow_module=ml)


@flow(name="train-denoiser")
def train_denoiser(task: str = "all", noise: str = "both", steps: int = 2000, batch: int = 16, crop: int = 128,
                   seed: int = 0, device: str = "cpu", out: str = "assets/models", resume: bool = False,
                   eval_only: bool = False, time_limit: float | None = None, ckpt_dir: str | None = None,
                   eval_steps: int = 32, lr: float = 2e-4, init: str | None = None) -> dict:
    """Fit the autoencoder (task vae/all) and train or evaluate the denoisers -> {name: eval}.

    `init`: fine-tune from saved models instead of from scratch: a directory holding <task>-<noise>/ models,
    optionally followed by ':gp' or ':white' to start every noise from that noise's model (e.g. 'assets/models:gp').
    """
    out = Path(out)
    tasks = ["vae", "sr8", "inpaint"] if task == "all" else [task]
    noises = ["gp", "white"] if noise == "both" else [noise]
    results = {}
    for t in tasks:
        if t == "vae":
            if eval_only:
                results.update(eval_model(out / VAE_NAME))
            else:
                fit_vae(out, seed)
                results[VAE_NAME] = json.loads((out / VAE_NAME / store.CARD).read_text())["eval"]
            continue
        for nz in noises:
            if eval_only:
                results.update(_eval_logged(out / f"{t}-{nz}", device, eval_steps))
            else:
                init_dir = None
                if init:
                    base, _, src_noise = init.partition(":")
                    init_dir = Path(base) / f"{t}-{src_noise or nz}"
                results.update(train_one(t, nz, out, steps, batch, crop, seed, device, resume, lr=lr, time_limit=time_limit,
                                         ckpt_dir=Path(ckpt_dir) if ckpt_dir else None, eval_steps=eval_steps,
                                         init=init_dir))
    return results


def cli(argv: list[str]) -> int:
    """`restore-video train ...`: parse argv, run the flow, print the eval numbers as JSON.

    `restore-video train residual ...` trains the lapped-latent regression + residual diffusion models instead
    (flows/train_residual.py: stages ae, import, reg, evalreg, diff, tune, save; --resume continues each from its
    checkpoint, --stage import --from assets/models/NAME turns a shipped model back into checkpoints).
    """
    if argv and argv[0] == "residual":
        from flows.train_residual import main

        return main(argv[1:])
    p = argparse.ArgumentParser(prog="restore-video train", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="all", choices=["sr8", "inpaint", "vae", "prior", "all"],
                   help="all = vae, sr8, inpaint; prior = the unconditional prior of the zero-shot solvers")
    p.add_argument("--noise", default="both", choices=["gp", "white", "both"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "assets" / "models"))
    p.add_argument("--ckpt-dir", default=None, help="checkpoints (default <repo>/.cache/train-denoiser)")
    p.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--eval-steps", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (200-step warm-up, then cosine to 5%%)")
    p.add_argument("--init", default=None,
                   help="fine-tune from saved models: DIR holding <task>-<noise>/, or DIR:gp / DIR:white for one source noise")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--no-prefect", action="store_true", help="run the flow body as a plain function")
    a = p.parse_args(argv)
    fn = getattr(train_denoiser, "fn", train_denoiser) if a.no_prefect else train_denoiser
    res = fn(task=a.task, noise=a.noise, steps=a.steps, batch=a.batch, crop=a.crop, seed=a.seed, device=a.device,
             out=a.out, resume=a.resume, eval_only=a.eval_only, time_limit=a.time_limit, ckpt_dir=a.ckpt_dir,
             eval_steps=a.eval_steps, lr=a.lr, init=a.init)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
