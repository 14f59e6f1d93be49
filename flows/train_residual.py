"""train-residual: lapped latent + regression + residual diffusion models, trained on photographs (CPU-sized).

    python -m flows.train_residual --stage ae|reg|diff|eval|save [--task sr8|inpaint] [--noise gp|white]
        [--steps N] [--time-limit S] [--ckpt-dir DIR] [--out assets/models] [--resume]

Stages (each checkpointed to --ckpt-dir every --ckpt-every steps and at the end, and resumable with --resume):
  ae    fit the lapped f=8 autoencoder (ops.lapped) on crops of the training photographs -> <ckpt>/ae
  reg   train the task's regressor (L1 in pixel space through the linear decoder) -> <ckpt>/<task>-reg
  diff  train the residual diffusion model (EDM loss, GP or white noise) with the regressor frozen -> <ckpt>/<task>-<noise>
  save  write <out>/<task>-res-<noise>/ (fp16 safetensors + card) and evaluate it on the held-out views
Data: `make train-data` (storage.train_data): TRAIN photographs + scikit-image photographs; evaluation on the TEST
photographs and scikit-image's held-out pictures (never trained on).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ops import degrade
from ops.lapped import LappedAutoencoder, fit_lapped, init_from_pca
from ops.autoencoders import fit_pca_autoencoder, image_patches
from ops.residual import build_residual_model
from ops.training import (blockiness, degrade_batch, edm_loss, make_noise, mean_gradient, psnr, random_crops, sample,
                          telea_inpaint)
from storage import train_data

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CKPT = ROOT / ".cache" / "train-residual"
LATENT_CHANNELS = 48
REGRESSOR = {"width": 64, "blocks": 4}
UNET = {"block_out_channels": [48, 96], "layers_per_block": 1, "attention": False, "norm_num_groups": 16}
TIME_SCALE = 250.0
BLOCK_WEIGHT = 0.1  # sr8 regressor: without it, its output's cell-border ratio is 1.44x the truth's (step 700)


# ---------------------------------------------------------------- checkpoints (safetensors + json)
def save_ckpt(path: Path, tensors: dict, state: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / "weights.tmp"))
    (path / "weights.tmp").replace(path / "weights.safetensors")
    (path / "state.json").write_text(json.dumps(state))


def load_ckpt(path: Path):
    from safetensors.torch import load_file

    if not (path / "state.json").exists():
        return None, None
    return load_file(str(path / "weights.safetensors")), json.loads((path / "state.json").read_text())


def _flat(prefix: str, module: torch.nn.Module) -> dict:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _opt_flat(opt: torch.optim.Optimizer) -> dict:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _opt_load(opt: torch.optim.Optimizer, tensors: dict) -> None:
    sd = opt.state_dict()
    state = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def _sub(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# ---------------------------------------------------------------- data
def training_images() -> list[torch.Tensor]:
    return list(train_data.load("train").values())


def heldout_views(size: int = 256) -> tuple[torch.Tensor, list[str]]:
    """Held-out views (N, 3, size, size): two crops per TEST photograph + storage.models.eval_views (scikit-image)."""
    from storage.models import eval_views

    views, names = [], []
    for name, im in train_data.load("test").items():
        if name.startswith("skimage:"):
            continue
        h, w = im.shape[-2:]
        for y, x in (((h - size) // 2, (w - size) // 2), ((h - size) // 4, (3 * (w - size)) // 4)):
            views.append(im[None, :, y : y + size, x : x + size])
            names.append(name)
    sk = eval_views(train_data.SKIMAGE_TEST, size)
    names += [f"skimage:{n}" for n in train_data.SKIMAGE_TEST for _ in range(2)]
    return torch.cat(views + [sk]), names


def batches(images, g: torch.Generator, batch: int, crop: int):
    return lambda step: random_crops(g, images, batch, crop)


# ---------------------------------------------------------------- stages
def load_ae(ckpt: Path) -> LappedAutoencoder:
    tensors, state = load_ckpt(ckpt / "ae")
    if state is None or not state.get("done"):
        raise SystemExit(f"no fitted autoencoder in {ckpt / 'ae'}: run --stage ae first")
    ae = LappedAutoencoder(state["latent_channels"], state["factor"])
    ae.load_state_dict(_sub(tensors, "ae"))
    return ae


@torch.no_grad()
def latent_report(ae, views: torch.Tensor, prefix: str, seed: int, error: float = 0.3) -> dict:
    """Autoencoder PSNR and blockiness, and the blockiness of a decoded latent error (white, `error` x the latent's
    per-channel std; what a denoiser's mistakes look like after decoding)."""
    z = ae.encode(views)
    g = torch.Generator().manual_seed(seed)
    noisy = z + error * torch.randn(z.shape, generator=g) * z.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    rec, err = ae.decode(z), ae.decode(noisy)
    # Fine-detail error: one unit of pixel energy in each of the last half of the channels.
    fine = torch.zeros_like(z)
    c = z.shape[1]
    probe = ae.decode(torch.eye(c).view(c, c, 1, 1), clamp=False) - ae.decode(torch.zeros(1, c, 1, 1), clamp=False)
    energy = probe.flatten(1).norm(dim=1)  # (C,) pixel energy of each channel's synthesis function
    fine[:, c // 2 :] = 0.05 * torch.randn(fine[:, c // 2 :].shape, generator=g) / energy[c // 2 :].view(1, -1, 1, 1)
    fine_err = ae.decode(z + fine)
    return {f"{prefix}psnr": float(psnr(rec, views).mean()), f"{prefix}blockiness": float(blockiness(rec, views)),
            f"{prefix}error_blockiness": float(blockiness(err, views)), f"{prefix}error_psnr": float(psnr(err, views).mean()),
            f"{prefix}fine_error_blockiness": float(blockiness(fine_err, views)), f"{prefix}fine_error_psnr": float(psnr(fine_err, views).mean())}


def stage_ae(ckpt: Path, steps: int, seed: int, batch: int = 16, crop: int = 64, log_every: int = 100) -> dict:
    images = training_images()
    g = torch.Generator().manual_seed(seed)
    patches = image_patches(random_crops(g, images, 256, crop))
    pca = fit_pca_autoencoder(patches, LATENT_CHANNELS)
    ae = init_from_pca(LappedAutoencoder(LATENT_CHANNELS), pca.components, pca.mean)
    t0 = time.time()
    losses = fit_lapped(ae, batches(images, g, batch, crop), steps, generator=g,
                        log=lambda s, l: print(f"ae step {s} mse {l:.6f}", flush=True) if s % log_every == 0 else None)
    state = {"done": True, "steps": steps, "latent_channels": LATENT_CHANNELS, "factor": ae.factor, "seed": seed,
             "batch": batch, "crop": crop, "wall_time_s": round(time.time() - t0, 1), "losses": losses}
    views, _ = heldout_views()
    state["eval"] = {**latent_report(ae, views, "", seed), **latent_report(pca, views, "pca_", seed)}
    save_ckpt(ckpt / "ae", _flat("ae", ae), state)
    print(json.dumps(state["eval"]), flush=True)
    return state


def _model(task: str, noise: str | None, ae: LappedAutoencoder, sigma_data: float | None):
    card = {"task": task, "noise": noise, "autoencoder": ae.config(), "sigma_max": 10.0,
            **({"prefill": "telea"} if task == "inpaint" else {}),
            "residual": {"regressor": REGRESSOR, "unet": UNET if sigma_data else None, "sigma_data": sigma_data,
                         "time_scale": TIME_SCALE}}
    model = build_residual_model(card, ae)
    model.autoencoder.load_state_dict(ae.state_dict())
    model.autoencoder.requires_grad_(False)
    return model, card


def _lr(base: float, step: int, frac: float, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then cosine to 5 % of `base` at frac = 1 (of the steps or the time)."""
    return base * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _loop(name: str, path: Path, module: torch.nn.Module, loss_fn, steps: int, lr: float, seed: int, resume: bool,
          time_limit: float | None, ckpt_every: int, extra_state: dict, ema_decay: float = 0.999,
          stop_at: int | None = None):
    """Shared resumable Adam loop with EMA; loss_fn(step, generator) -> loss. Returns (ema state, state).

    Stops at `steps`, at step `stop_at`, or once the stage's wall time (over all resumed calls) reaches `time_limit`
    s; the cosine learning-rate schedule runs over the steps, or over the time limit when one is set (as
    flows/train_denoiser.py does). A later call with resume=True continues from the checkpoint exactly (weights,
    EMA, Adam moments, data RNG; with a time limit the schedule depends on the measured wall time)."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    ema = {k: v.detach().clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    step, wall0, losses = 0, 0.0, []
    if resume:
        tensors, state = load_ckpt(path)
        if state is not None:
            module.load_state_dict(_sub(tensors, "model"))
            ema = _sub(tensors, "ema")
            _opt_load(opt, tensors)
            g.set_state(tensors["rng"])
            step, wall0, losses = state["step"], state["wall_time_s"], state["losses"]
            print(f"{name}: resumed at step {step}", flush=True)
    t0 = time.time()

    def save(done: bool):
        state = {**extra_state, "step": step, "wall_time_s": round(wall0 + time.time() - t0, 1), "losses": losses,
                 "done": done, "lr": lr, "seed": seed, "target_steps": steps}
        save_ckpt(path, {**_flat("model", module), **{f"ema.{k}": v for k, v in ema.items()}, **_opt_flat(opt),
                         "rng": g.get_state()}, state)
        return state

    module.train()
    acc = []
    while step < min(steps, stop_at or steps) and not (time_limit and wall0 + time.time() - t0 > time_limit):
        frac = (wall0 + time.time() - t0) / time_limit if time_limit else step / max(steps, 1)
        for group in opt.param_groups:
            group["lr"] = _lr(lr, step, frac)
        loss = loss_fn(step, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for k, v in module.state_dict().items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1 - d)
                else:
                    ema[k].copy_(v)
        step += 1
        acc.append(float(loss.detach()))
        if step % 25 == 0:
            losses.append([step, sum(acc) / len(acc)])
            acc = []
            print(f"{name} step {step} loss {losses[-1][1]:.5f} {time.time() - t0:.0f}s", flush=True)
        if step % ckpt_every == 0:
            save(False)
    return ema, save(step >= steps)


def stage_reg(task: str, ckpt: Path, steps: int, seed: int, resume: bool, time_limit, batch: int = 8, crop: int = 128,
              lr: float = 1e-3, ckpt_every: int = 100, stop_at: int | None = None) -> dict:
    ae = load_ae(ckpt)
    model, _ = _model(task, None, ae, None)
    images = training_images()
    model.regressor.requires_grad_(True)

    def loss_fn(step, g):
        x = random_crops(g, images, batch, crop)  # (B, 3, crop, crop)
        degraded, mask = degrade_batch(task, x, g, masks="mixed")
        out = model.autoencoder.decode(model.predict(degraded, mask), clamp=False)  # (B, 3, crop, crop)
        err = (out - x).abs()
        if mask is None:  # + the block pattern a stride-8 predictor is prone to (period-8 corrections)
            return err.mean() + block_weight * (blockiness(out, x, model.factor) - 1) ** 2
        return (err * mask).sum() / mask.sum().clamp_min(1) / 3 + 0.1 * err.mean()

    block_weight = BLOCK_WEIGHT if task == "sr8" else 0.0
    loss_name = "L1 pixel + %g (blockiness - 1)^2" % block_weight if task == "sr8" else "L1 pixel on holes + 0.1 L1 everywhere"
    ema, state = _loop(f"{task}-reg", ckpt / f"{task}-reg", model.regressor, loss_fn, steps, lr, seed, resume,
                       time_limit, ckpt_every, {"batch": batch, "crop": crop, "loss": loss_name},
                       stop_at=stop_at)
    return state


def load_regressor(model, ckpt: Path, task: str) -> dict:
    tensors, state = load_ckpt(ckpt / f"{task}-reg")
    if state is None:
        raise SystemExit(f"no regressor in {ckpt / f'{task}-reg'}: run --stage reg first")
    model.regressor.load_state_dict(_sub(tensors, "ema"))
    return state


def residual_std(model, images, task: str, g: torch.Generator, n: int = 32, crop: int = 128) -> float:
    """std of x0 - mu over training crops (the residual's sigma_data)."""
    with torch.no_grad():
        x = random_crops(g, images, n, crop)
        degraded, mask = degrade_batch(task, x, g, masks="mixed")
        return float((model.encode(x) - model.predict(degraded, mask)).std())


def stage_diff(task: str, noise: str, ckpt: Path, steps: int, seed: int, resume: bool, time_limit, batch: int = 8,
               crop: int = 128, lr: float = 5e-4, ckpt_every: int = 100, stop_at: int | None = None) -> dict:
    ae = load_ae(ckpt)
    images = training_images()
    probe, _ = _model(task, noise, ae, 1.0)
    load_regressor(probe, ckpt, task)
    path = ckpt / f"{task}-{noise}"
    _, prev = load_ckpt(path) if resume else (None, None)
    sd = prev["sigma_data"] if prev else round(residual_std(probe, images, task, torch.Generator().manual_seed(seed + 7)), 4)
    model, _ = _model(task, noise, ae, sd)
    load_regressor(model, ckpt, task)
    model.regressor.requires_grad_(False)

    def loss_fn(step, g):
        x = random_crops(g, images, batch, crop)
        degraded, mask = degrade_batch(task, x, g, masks="mixed")
        with torch.no_grad():
            x0 = model.encode(x)
            cond = model.condition(degraded, mask)
        n = make_noise(noise, g, x0.shape)
        return edm_loss(model, x0, cond, n, g, sd)

    ema, state = _loop(f"{task}-{noise}", path, model.denoiser, loss_fn, steps, lr, seed, resume, time_limit,
                       ckpt_every, {"batch": batch, "crop": crop, "sigma_data": sd, "noise": noise}, stop_at=stop_at)
    return state


# ---------------------------------------------------------------- save + evaluate
def assemble(task: str, noise: str, ckpt: Path, weights: str = "ema"):
    """The trained model and its card from the checkpoints (`weights`: the diffusion model's 'ema' or raw 'model')."""
    ae = load_ae(ckpt)
    if noise == "none":  # regression only: D = mu at every sigma (ops.residual), no diffusion weights
        tensors, dstate = {}, {"step": 0, "batch": 0, "crop": 0, "wall_time_s": 0.0, "lr": 0.0, "sigma_data": None}
    else:
        tensors, dstate = load_ckpt(ckpt / f"{task}-{noise}")
        if dstate is None:
            raise SystemExit(f"no diffusion checkpoint in {ckpt / f'{task}-{noise}'}")
    model, card = _model(task, None if noise == "none" else noise, ae, dstate["sigma_data"])
    rstate = load_regressor(model, ckpt, task)
    if model.denoiser is not None:
        model.denoiser.load_state_dict(_sub(tensors, weights))
    _, astate = load_ckpt(ckpt / "ae")
    card.update(kind="residual", name=f"{task}-reg" if noise == "none" else f"{task}-res-{noise}", sigma_min=0.002,
                training={"autoencoder": {k: astate[k] for k in ("steps", "batch", "crop", "wall_time_s", "eval")},
                          "regressor": {k: rstate[k] for k in ("step", "batch", "crop", "wall_time_s", "loss", "lr")},
                          "diffusion": {**{k: dstate[k] for k in ("step", "batch", "crop", "wall_time_s", "lr", "sigma_data")}, "weights": weights},
                          "device": "cpu (2 shared cores, torch.set_num_threads(1))"},
                data={"train_photographs": list(train_data.TRAIN), "train_skimage": list(train_data.SKIMAGE_TRAIN),
                      "val_photographs": list(train_data.VAL), "test_photographs": list(train_data.TEST),
                      "test_skimage": list(train_data.SKIMAGE_TEST), "source": "storage/train_data.py (make train-data)",
                      "augment": "random crops, rescale s~U(0.5,1) antialiased bicubic, horizontal flips"},
                steps=dstate["step"] + rstate["step"], wall_time_s=round(astate["wall_time_s"] + rstate["wall_time_s"] + dstate["wall_time_s"], 1))
    model.card = card
    return model.eval(), card


@torch.no_grad()
def evaluate_residual(model, views: torch.Tensor, steps: int = 32, seed: int = 0, masks: str = "free") -> dict:
    """Held-out numbers: diffusion sample (GP and white noise), regression mean, bicubic (+ back-projection) / Telea."""
    g = torch.Generator().manual_seed(seed)
    degraded, mask = degrade_batch(model.task, views, g, masks=masks)
    cond = model.condition(degraded, mask)
    mu = model.decode(cond[:, : model.latent_channels])
    shape = (views.shape[0], model.latent_channels, views.shape[-2] // model.factor, views.shape[-1] // model.factor)
    low = degrade.downsample(views, model.factor) if model.task == "sr8" else None

    def finish(img):  # what tasks/decode.py does: back-projection (sr8) or paste the known pixels (inpaint)
        if low is not None:
            return degrade.back_project(img, low, model.factor)
        return mask * img + (1 - mask) * views

    def stats(img, prefix):
        out = {f"{prefix}psnr": float(psnr(img, views).mean()),
               f"{prefix}grad_ratio": float((mean_gradient(img) / mean_gradient(views)).mean()),
               f"{prefix}blockiness": float(blockiness(img, views))}
        if mask is not None:
            out[f"{prefix}hole_psnr"] = float(psnr(img, views, mask).mean())
        return out

    res = {"views": int(views.shape[0]), "steps": steps, "ae_psnr": float(psnr(model.decode(model.encode(views)), views).mean())}
    for kind in ("gp", "white") if model.noise else ("white",):
        gn = torch.Generator().manual_seed(seed + 1)
        out = finish(model.decode(sample(model, cond, make_noise(kind, gn, shape), steps)))
        res.update(stats(out, "" if kind == (model.noise or "white") else "mismatch_"))
        if kind == (model.noise or "white"):
            samples = out
    if model.noise:
        res["mismatch_noise"] = "white" if model.noise == "gp" else "gp"
    res.update(stats(finish(mu), "regression_"))
    if model.task == "sr8":
        bic = degraded
        res.update(stats(bic, "bicubic_"))
        res.update(stats(degrade.back_project(bic, low, model.factor), "bicubic_bp_"))
    else:
        res.update(stats(telea_inpaint(degraded, mask), "telea_"))
        res["hole_fraction"] = float(mask.mean())
        res["known_psnr"] = float(psnr(samples, views, 1 - mask).mean())
    return res, samples


@torch.no_grad()
def stage_evalreg(task: str, ckpt: Path, masks: str = "free") -> dict:
    """Held-out numbers of the regressor alone (what the residual diffusion starts from)."""
    model, _ = _model(task, None, load_ae(ckpt), None)
    load_regressor(model, ckpt, task)
    views, _ = heldout_views()
    g = torch.Generator().manual_seed(0)
    degraded, mask = degrade_batch(task, views, g, masks=masks)
    out = model.decode(model.predict(degraded, mask))
    res = {}
    if task == "sr8":
        low = degrade.downsample(views, model.factor)
        pairs = {"regression": degrade.back_project(out, low, model.factor), "regression_raw": out, "bicubic": degraded,
                 "bicubic_bp": degrade.back_project(degraded, low, model.factor)}
    else:
        pairs = {"regression": mask * out + (1 - mask) * views, "telea": telea_inpaint(degraded, mask)}
    for k, img in pairs.items():
        res[k] = {"psnr": round(float(psnr(img, views).mean()), 3), "grad_ratio": round(float((mean_gradient(img) / mean_gradient(views)).mean()), 3),
                  "blockiness": round(float(blockiness(img, views)), 3)}
        if mask is not None:
            res[k]["hole_psnr"] = round(float(psnr(img, views, mask).mean()), 3)
    print(json.dumps(res), flush=True)
    return res


def stage_save(task: str, noise: str, ckpt: Path, out: Path, eval_steps: int, weights: str = "ema") -> dict:
    from storage.models import save_model

    model, card = assemble(task, noise, ckpt, weights)
    views, names = heldout_views()
    res, _ = evaluate_residual(model, views, eval_steps)
    card["eval"] = {**res, "heldout_views": names, "size": 256}
    if task == "inpaint":  # the numbers above use large free-form holes; these thin scratches and dust
        card["eval"]["masks"] = "free-form strokes + boxes (ops.degrade.random_masks)"
        card["eval"]["scratch"], _ = evaluate_residual(model, views, eval_steps, masks="scratch")
        card["eval"]["scratch"]["masks"] = "scratches 1-4 px + dust (ops.training.scratch_masks)"
    from storage.sample import SOURCE_IMAGE, render_sample_frames

    frames = torch.from_numpy(render_sample_frames()[::4].copy()).permute(0, 3, 1, 2).float() / 255  # (4, 3, 256, 256)
    demo, _ = evaluate_residual(model, frames, eval_steps)
    card["eval_demo_frames"] = {**demo, "source": f"storage/sample.py frames 0, 4, 8, 12 (skimage {SOURCE_IMAGE}), one image at a time"}
    save_model(model, out / card["name"], card)
    print(json.dumps(card["eval"], indent=1), flush=True)
    return card["eval"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.train_residual", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=["ae", "reg", "evalreg", "diff", "save"])
    p.add_argument("--task", default="sr8", choices=["sr8", "inpaint"])
    p.add_argument("--noise", default="gp", choices=["gp", "white", "none"], help="none (save): the regression-only model")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None, help="the stage's wall-time budget in s over all resumed calls; the lr schedule then follows the time")
    p.add_argument("--stop-at", type=int, default=None, help="stop (checkpointed) at this step of --steps; --resume continues")
    p.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT))
    p.add_argument("--out", default=str(ROOT / "assets" / "models"))
    p.add_argument("--eval-steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="save: EMA or raw diffusion weights")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = Path(a.ckpt_dir)
    if a.stage == "ae":
        stage_ae(ckpt, a.steps, a.seed)
    elif a.stage == "reg":
        stage_reg(a.task, ckpt, a.steps, a.seed, a.resume, a.time_limit, a.batch, a.crop, a.lr or 1e-3, stop_at=a.stop_at)
    elif a.stage == "evalreg":
        for masks in (("free", "scratch") if a.task == "inpaint" else ("free",)):
            stage_evalreg(a.task, ckpt, masks)
    elif a.stage == "diff":
        stage_diff(a.task, a.noise, ckpt, a.steps, a.seed, a.resume, a.time_limit, a.batch, a.crop, a.lr or 5e-4, stop_at=a.stop_at)
    else:
        stage_save(a.task, a.noise, ckpt, Path(a.out), a.eval_steps, a.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
