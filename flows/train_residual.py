"""train-residual: lapped latent + regression + residual diffusion models, trained on photographs (CPU-sized).

    python -m flows.train_residual --stage ae|import|reg|diff|evalreg|tune|refine|save [--task sr8|sr4|inpaint] [--noise gp|white]
        [--steps N] [--time-limit S] [--ckpt-dir DIR] [--out assets/models] [--resume] [--from MODEL_DIR]

Stages (each checkpointed to --ckpt-dir every --ckpt-every steps and at the end, and resumable with --resume):
  ae    fit the lapped f=8 autoencoder (ops.lapped) on crops of the training photographs -> <ckpt>/ae
  import  checkpoints from a shipped model (--from assets/models/NAME): its autoencoder, regressor, diffusion
        weights (and refiner) become <ckpt>/ae, <ckpt>/<task>-reg, <ckpt>/<task>-<noise>(-refine) (no optimizer state: Adam restarts with
        a warm-up), so `--resume` continues training it; from a model of another task (sr8 -> sr4) they are the
        initialisation (step 0, recorded as "init" in the card)
  reg   train the task's regressor (L1 in pixel space through the linear decoder) -> <ckpt>/<task>-reg
  diff  train the residual diffusion model (EDM loss, GP or white noise) with the regressor frozen -> <ckpt>/<task>-<noise>
  refine  train the pixel DecodeRefiner (ops.residual) on decoded samples of the model's own sampler (its schedule:
        --sigma-max) on training crops -> <ckpt>/<task>-<noise>-refine; `save` then puts it into the model
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

from ops import degrade
from ops.lapped import LappedAutoencoder, fit_lapped, init_from_pca
from ops.autoencoders import fit_pca_autoencoder, image_patches
from ops.residual import DecodeRefiner, build_residual_model
from ops.metrics import blockiness, mean_gradient, phase_profile, psnr
from ops.training import degrade_batch, edm_loss, make_noise, random_crops, sample, telea_inpaint
from storage import train_data
from tasks.degrade import SR_FACTORS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CKPT = ROOT / ".cache" / "train-residual"
LATENT_CHANNELS = 48
REGRESSOR = {"width": 64, "blocks": 4}
UNET = {"block_out_channels": [48, 96], "layers_per_block": 1, "attention": False, "norm_num_groups": 16}
TIME_SCALE = 250.0
REFINER = {"width": 64, "blocks": 2}
REFINE_STEPS = (8, 16, 32)  # sampler steps the refiner's training samples are drawn with, in turn
BLOCK_WEIGHT = 0.1  # sr regressors: without it, sr8's output's cell-border ratio is 1.44x the truth's (step 700)
TASKS = ("sr8", "sr4", "inpaint")


def model_batch(task: str, x: torch.Tensor, g: torch.Generator, masks: str = "mixed"):
    """What a model's condition()/predict() takes for ground truth x (B, 3, H, W) -> (input, mask or None, bicubic):
    sr8: the bicubic x8 upsampling; sr4: the low-res frame itself (H/4, W/4), as the pipeline gives it;
    inpaint: the image with holes + mask. `bicubic` is the bicubic upsampling (sr) or the input (inpaint)."""
    degraded, mask = degrade_batch(task, x, g, masks=masks)
    if task == "sr4":
        return degrade.downsample(x, SR_FACTORS[task]), mask, degraded
    return degraded, mask, degraded


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


def validation_views(size: int = 256) -> torch.Tensor:
    """Views (N, 3, size, size) of the VAL photographs (never trained on, not the cards' test views): four crops
    each, what a schedule is tuned on."""
    views = []
    for im in train_data.load("val").values():
        h, w = im.shape[-2:]
        for fy, fx in ((0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
            y, x = int(fy * (h - size)), int(fx * (w - size))
            views.append(im[None, :, y : y + size, x : x + size])
    return torch.cat(views)


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


def stage_import(source: Path, task: str, noise: str | None, ckpt: Path, seed: int = 0) -> dict:
    """Checkpoints from a shipped model directory (card.json + model.safetensors): the autoencoder (if <ckpt>/ae is
    missing), the regressor (if <ckpt>/<task>-reg is missing) and, with `noise`, the diffusion model (if
    <ckpt>/<task>-<noise> is missing). The same task (and noise) continues its training: step and wall time carry
    on; another task or noise (sr8 -> sr4, gp -> white) starts from step 0 with the weights as "init". Adam has no
    state to import: a fresh one warms up again from the imported step (`warm_start`)."""
    from safetensors.torch import load_file

    from storage.models import CARD, WEIGHTS

    card = json.loads((source / CARD).read_text())
    if card.get("kind") != "residual":
        raise SystemExit(f"{source} is not a residual model (its card has kind {card.get('kind')!r})")
    weights = {k: v.float() for k, v in load_file(str(source / WEIGHTS)).items()}
    tr, done = card["training"], {}
    if load_ckpt(ckpt / "ae")[1] is None:
        ae_state = {"done": True, "latent_channels": card["autoencoder"]["latent_channels"],
                    "factor": card["autoencoder"]["factor"], "seed": seed, **tr["autoencoder"]}
        save_ckpt(ckpt / "ae", {f"ae.{k}": v for k, v in _sub(weights, "autoencoder").items()}, ae_state)
        done["ae"] = str(ckpt / "ae")
    else:
        mine = _sub(load_ckpt(ckpt / "ae")[0], "ae")
        theirs = _sub(weights, "autoencoder")
        if any((mine[k] - theirs[k]).abs().max() > 1e-2 * theirs[k].abs().max().clamp_min(1e-6) for k in theirs):
            raise SystemExit(f"{source}'s autoencoder differs from the one in {ckpt / 'ae'}: use another --ckpt-dir")

    def write(path: Path, prefix: str, part: dict, same: bool, extra: dict) -> None:
        w = _sub(weights, prefix)
        step = int(part["step"]) if same else 0
        state = {**extra, "step": step, "wall_time_s": float(part["wall_time_s"]) if same else 0.0, "losses": [],
                 "done": False, "lr": part.get("lr"), "seed": seed, "batch": part["batch"], "crop": part["crop"],
                 "warm_start": step}
        if not same:
            state["init"] = {"from": card["name"], "task": card["task"], "noise": card.get("noise"), "steps": int(part["step"]),
                             "weights_sha256": card.get("weights_sha256")}
        g = torch.Generator().manual_seed(seed + 1 + step)
        save_ckpt(path, {**{f"model.{k}": v for k, v in w.items()}, **{f"ema.{k}": v.clone() for k, v in w.items()},
                         "rng": g.get_state()}, state)
        done[path.name] = {"from": card["name"], "continued" if same else "init": int(part["step"])}

    if load_ckpt(ckpt / f"{task}-reg")[1] is None:
        write(ckpt / f"{task}-reg", "regressor", tr["regressor"], card["task"] == task,
              {"loss": tr["regressor"]["loss"]})
    if noise is not None and load_ckpt(ckpt / f"{task}-{noise}")[1] is None:
        if not _sub(weights, "denoiser"):
            raise SystemExit(f"{source} is regression-only: it has no diffusion model to import")
        same = card["task"] == task and card.get("noise") == noise
        recipe = {k: tr["diffusion"][k] for k in ("p_mean", "p_std", "block_weight", "phases") if same and k in tr["diffusion"]}
        write(ckpt / f"{task}-{noise}", "denoiser", tr["diffusion"], same,
              {"sigma_data": tr["diffusion"]["sigma_data"] if same else None, "noise": noise, **recipe})
    ref = tr.get("refiner")  # only the refiner trained on this very model's samples (a white twin borrows the GP one's)
    if (noise is not None and ref and card["task"] == task and ref["trained_on"] == f"{task}-res-{noise}"
            and load_ckpt(ckpt / f"{task}-{noise}-refine")[1] is None):
        write(ckpt / f"{task}-{noise}-refine", "refiner", ref, True,
              {"noise": noise, "pool": ref["pool"], "sampler_steps": ref["sampler_steps"], "schedule": ref["schedule"],
               "loss": ref["loss"], **card["refiner"]})
    print(json.dumps(done), flush=True)
    return done


def _model(task: str, noise: str | None, ae: LappedAutoencoder, sigma_data: float | None, schedule: dict | None = None):
    """schedule: {"sigma_max": s, "start": "regression"} for a truncated schedule (ResidualRestorationModel.start)."""
    card = {"task": task, "noise": noise, "autoencoder": ae.config(), "sigma_max": 10.0, **(schedule or {}),
            **({"prefill": "telea"} if task == "inpaint" else {}),
            **({"sr_factor": SR_FACTORS[task]} if task == "sr4" else {}),
            "residual": {"regressor": REGRESSOR, "unet": UNET if sigma_data else None, "sigma_data": sigma_data,
                         "time_scale": TIME_SCALE}}
    model = build_residual_model(card, ae)
    model.autoencoder.load_state_dict(ae.state_dict())
    model.autoencoder.requires_grad_(False)
    return model, card


def _lr(base: float, step: int, frac: float, warmup: int = 100, warm_start: int = 0) -> float:
    """Linear warm-up over `warmup` steps from `warm_start` (0, or the step a fresh Adam took over imported weights),
    then cosine to 5 % of `base` at frac = 1 (of the steps or the time)."""
    return base * min(1.0, (step - warm_start + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


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
    step, wall0, losses, carried = 0, 0.0, [], {}
    if resume:
        tensors, state = load_ckpt(path)
        if state is not None:
            module.load_state_dict(_sub(tensors, "model"))
            ema = _sub(tensors, "ema")
            _opt_load(opt, tensors)
            g.set_state(tensors["rng"])
            step, wall0, losses = state["step"], state["wall_time_s"], state["losses"]
            carried = {k: state[k] for k in ("warm_start", "init") if k in state}
            print(f"{name}: resumed at step {step}", flush=True)
    t0 = time.time()

    def save(done: bool):
        state = {**extra_state, **carried, "step": step, "wall_time_s": round(wall0 + time.time() - t0, 1), "losses": losses,
                 "done": done, "lr": lr, "seed": seed, "target_steps": steps}
        save_ckpt(path, {**_flat("model", module), **{f"ema.{k}": v for k, v in ema.items()}, **_opt_flat(opt),
                         "rng": g.get_state()}, state)
        return state

    module.train()
    acc = []
    while step < min(steps, stop_at or steps) and not (time_limit and wall0 + time.time() - t0 > time_limit):
        ws = carried.get("warm_start", 0)  # imported weights: the cosine runs from there to `steps`
        frac = (wall0 + time.time() - t0) / time_limit if time_limit else (step - ws) / max(steps - ws, 1)
        for group in opt.param_groups:
            group["lr"] = _lr(lr, step, frac, warm_start=ws)
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
        inp, mask, _ = model_batch(task, x, g)
        out = model.autoencoder.decode(model.predict(inp, mask), clamp=False)  # (B, 3, crop, crop)
        err = (out - x).abs()
        if mask is None:  # + the block pattern a stride-8 predictor is prone to (period-8 corrections)
            return err.mean() + block_weight * (blockiness(out, x, model.factor) - 1) ** 2
        return (err * mask).sum() / mask.sum().clamp_min(1) / 3 + 0.1 * err.mean()

    block_weight = BLOCK_WEIGHT if task in SR_FACTORS else 0.0
    loss_name = "L1 pixel + %g (blockiness - 1)^2" % block_weight if task in SR_FACTORS else "L1 pixel on holes + 0.1 L1 everywhere"
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
        inp, mask, _ = model_batch(task, x, g)
        return float((model.encode(x) - model.predict(inp, mask)).std())


def stage_diff(task: str, noise: str, ckpt: Path, steps: int, seed: int, resume: bool, time_limit, batch: int = 8,
               crop: int = 128, lr: float = 5e-4, ckpt_every: int = 100, stop_at: int | None = None,
               p_mean: float = -1.2, p_std: float = 1.2, block_weight: float = 0.0) -> dict:
    """EDM training of the residual diffusion model. p_mean / p_std: the log-normal training sigmas (a truncated
    schedule only samples sigma <= its sigma_max, so training can concentrate there); block_weight: weight of
    (blockiness(decode(D), x) - 1)^2, the cell-border pattern of the decoded prediction (measured before it: the
    samples of sr8-res-gp had blockiness 1.17 over a regression mean at 1.04)."""
    ae = load_ae(ckpt)
    images = training_images()
    probe, _ = _model(task, noise, ae, 1.0)
    load_regressor(probe, ckpt, task)
    path = ckpt / f"{task}-{noise}"
    _, prev = load_ckpt(path) if resume else (None, None)
    sd = (prev or {}).get("sigma_data") or round(residual_std(probe, images, task, torch.Generator().manual_seed(seed + 7)), 4)
    model, _ = _model(task, noise, ae, sd)
    load_regressor(model, ckpt, task)
    model.regressor.requires_grad_(False)

    def loss_fn(step, g):
        x = random_crops(g, images, batch, crop)
        inp, mask, _ = model_batch(task, x, g)
        with torch.no_grad():
            x0 = model.encode(x)
            cond = model.condition(inp, mask)
        n = make_noise(noise, g, x0.shape)
        penalty = None
        if block_weight:
            penalty = lambda d: block_weight * (blockiness(model.autoencoder.decode(d, clamp=False), x, model.factor) - 1) ** 2
        return edm_loss(model, x0, cond, n, g, sd, p_mean, p_std, penalty)

    recipe = {"lr": lr, "p_mean": p_mean, "p_std": p_std, "block_weight": block_weight}
    phases = list((prev or {}).get("phases", []))  # the recipe of every resumed call that changed it, by first step
    if not phases or {k: phases[-1].get(k) for k in recipe} != recipe:
        phases.append({"from_step": (prev or {}).get("step", 0), **recipe})
    ema, state = _loop(f"{task}-{noise}", path, model.denoiser, loss_fn, steps, lr, seed, resume, time_limit,
                       ckpt_every, {"batch": batch, "crop": crop, "sigma_data": sd, "noise": noise, "p_mean": p_mean,
                                    "p_std": p_std, "block_weight": block_weight, "phases": phases}, stop_at=stop_at)
    return state


def detail_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean |horizontal| + mean |vertical| pixel difference of (B, 3, H, W) -> scalar (what grad_ratio compares)."""
    return (images[..., :, 1:] - images[..., :, :-1]).abs().mean() + (images[..., 1:, :] - images[..., :-1, :]).abs().mean()


def phase_loss(out: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, cell: int) -> torch.Tensor:
    """Cell-periodic structure of `out` (B, 3, H, W): sum over the cell offsets p of (E_p(out) / E(reference) -
    P_p(truth))^2, E_p the mean |h + v pixel difference| at offset p (ops.metrics.phase_profile), E(reference) its
    mean over offsets for what the pipeline gave without the refiner (no gradient), P_p(truth) the truth's (flat)
    profile. Normalised by the reference's energy, not the output's: white noise would flatten the profile too,
    but raises E_p above the reference's and is penalised; so is blur (E_p below it), and blurring only the cell
    borders lowers E_0 alone and leaves the profile unequal. What it asks for is the reference's detail energy,
    spread evenly over the offsets as in a photograph."""
    share = phase_profile(out, cell) * detail_energy(out) / detail_energy(reference).detach()  # (cell,)
    return (share - phase_profile(truth, cell)).pow(2).sum()


def stage_refine(task: str, noise: str, ckpt: Path, steps: int, seed: int, resume: bool, time_limit, schedule: dict,
                 batch: int = 8, crop: int = 128, lr: float = 5e-4, pool: int = 300, phase_weight: float = 0.5,
                 energy_weight: float = 10.0, ckpt_every: int = 100, stop_at: int | None = None) -> dict:
    """Pixel refiner after the lapped decoder, trained on what the pipeline decodes: `pool` batches of training crops
    restored by the model's own sampler (its schedule, GP / white noise, REFINE_STEPS in turn), drawn once; loss
    L1(back_project(refine(sample)), truth) + phase_weight * phase_loss + energy_weight * (E(out) / E(reference) - 1)^2,
    E = detail_energy, reference = back_project(sample): the refiner moves detail off the cell-periodic pattern but
    keeps the sample's detail energy (L1 alone shrinks the sampled detail: held-out grad_ratio 0.81 -> 0.77 in a
    trial with phase_weight 0.1 and no energy term, 0.80 with 0.5). Measured before it (14 held-out views,
    sr8-res-gp): the decoded samples' cell-border ratio 1.13 over the truth's before back-projection (1.14 after),
    the regression mean's 1.00: the cell-periodic structure comes from the sampled residual."""
    model, _ = assemble(task, noise, ckpt, "ema", schedule)
    if task not in SR_FACTORS:
        raise SystemExit(f"--stage refine trains sr models (back-projection in its loss), not {task}")
    scale = SR_FACTORS[task]
    images = training_images()
    g = torch.Generator().manual_seed(seed + 11)
    xs, truths, lows = [], [], []
    t0 = time.time()
    with torch.no_grad():
        for b in range(pool):
            x = random_crops(g, images, batch, crop)  # (B, 3, crop, crop)
            inp, mask, _ = model_batch(task, x, g)
            cond = model.condition(inp, mask)
            shape = (batch, model.latent_channels, crop // model.factor, crop // model.factor)
            z = sample(model, cond, make_noise(noise, g, shape), REFINE_STEPS[b % len(REFINE_STEPS)])
            xs.append(model.decode(z).half()); truths.append(x.half()); lows.append(degrade.downsample(x, scale).half())
    xs, truths, lows = torch.cat(xs), torch.cat(truths), torch.cat(lows)  # (pool * B, 3, ...)
    print(f"refine: {len(xs)} samples drawn in {time.time() - t0:.0f}s", flush=True)
    refiner = DecodeRefiner(model.factor, **REFINER)

    def loss_fn(step, g):
        idx = torch.randint(len(xs), (batch,), generator=g)
        x, truth, low = xs[idx].float(), truths[idx].float(), lows[idx].float()
        out = degrade.back_project(refiner(x).clamp(0, 1), low, scale)
        with torch.no_grad():
            reference = degrade.back_project(x, low, scale)  # the pipeline's output without a refiner
        energy = (detail_energy(out) / detail_energy(reference) - 1).pow(2)
        return (out - truth).abs().mean() + phase_weight * phase_loss(out, reference, truth, model.factor) + energy_weight * energy

    loss_name = (f"L1(back_project(refine(sample)), truth) + {phase_weight:g} phase_loss + {energy_weight:g} "
                 "(detail_energy(out) / detail_energy(back_project(sample)) - 1)^2")
    ema, state = _loop(f"{task}-{noise}-refine", ckpt / f"{task}-{noise}-refine", refiner, loss_fn, steps, lr, seed,
                       resume, time_limit, ckpt_every, {"batch": batch, "crop": crop, "pool": pool * batch,
                                                         "sampler_steps": list(REFINE_STEPS), "schedule": schedule,
                                                         "noise": noise, "loss": loss_name, **REFINER},
                       stop_at=stop_at)
    return state


# ---------------------------------------------------------------- save + evaluate
def assemble(task: str, noise: str, ckpt: Path, weights: str = "ema", schedule: dict | None = None):
    """The trained model and its card from the checkpoints (`weights`: the diffusion model's 'ema' or raw 'model';
    `schedule`: the card's sampling schedule, see _model)."""
    ae = load_ae(ckpt)
    if noise == "none":  # regression only: D = mu at every sigma (ops.residual), no diffusion weights
        tensors, dstate = {}, {"step": 0, "batch": 0, "crop": 0, "wall_time_s": 0.0, "lr": 0.0, "sigma_data": None}
    else:
        tensors, dstate = load_ckpt(ckpt / f"{task}-{noise}")
        if dstate is None:
            raise SystemExit(f"no diffusion checkpoint in {ckpt / f'{task}-{noise}'}")
    model, card = _model(task, None if noise == "none" else noise, ae, dstate["sigma_data"], schedule)
    rstate = load_regressor(model, ckpt, task)
    if model.denoiser is not None:
        model.denoiser.load_state_dict(_sub(tensors, weights))
    _, astate = load_ckpt(ckpt / "ae")
    card.update(kind="residual", name=f"{task}-reg" if noise == "none" else f"{task}-res-{noise}", sigma_min=0.002,
                training={"autoencoder": {k: astate[k] for k in ("steps", "batch", "crop", "wall_time_s", "eval")},
                          "regressor": {k: rstate[k] for k in ("step", "batch", "crop", "wall_time_s", "loss", "lr", "init") if k in rstate},
                          "diffusion": {**{k: dstate[k] for k in ("step", "batch", "crop", "wall_time_s", "lr", "sigma_data", "p_mean", "p_std", "block_weight", "phases", "init") if k in dstate}, "weights": weights},
                          "device": "cpu (2 shared cores, torch.set_num_threads(1))"},
                data={"train_photographs": list(train_data.TRAIN), "train_skimage": list(train_data.SKIMAGE_TRAIN),
                      "val_photographs": list(train_data.VAL), "test_photographs": list(train_data.TEST),
                      "test_skimage": list(train_data.SKIMAGE_TEST), "source": "storage/train_data.py (make train-data)",
                      "augment": "random crops, rescale s~U(0.5,1) antialiased bicubic, horizontal flips"},
                steps=dstate["step"] + rstate["step"], wall_time_s=round(astate["wall_time_s"] + rstate["wall_time_s"] + dstate["wall_time_s"], 1))
    refine = ckpt / f"{task}-{noise}-refine"
    twin = ckpt / f"{task}-gp-refine"  # a white model takes the refiner trained on its GP twin's samples
    source = refine if load_ckpt(refine)[1] else twin if noise != "none" and load_ckpt(twin)[1] else None
    if source is not None:
        rtensors, fstate = load_ckpt(source)
        card["refiner"] = {k: fstate[k] for k in REFINER}
        model.refiner = DecodeRefiner(model.factor, **card["refiner"])
        model.refiner.load_state_dict(_sub(rtensors, "ema"))
        card["training"]["refiner"] = {"trained_on": f"{task}-res-{fstate['noise']}",
                                       "inputs": "that model's decoded samples (its own sampler) on training crops",
                                       **{k: fstate[k] for k in ("step", "batch", "crop", "pool", "sampler_steps",
                                                                 "schedule", "loss", "lr", "wall_time_s")},
                                       "weights": "ema"}
        card["steps"] += fstate["step"]
        card["wall_time_s"] = round(card["wall_time_s"] + fstate["wall_time_s"], 1)
    model.card = card
    return model.eval(), card


@torch.no_grad()
def evaluate_residual(model, views: torch.Tensor, steps: int = 32, seed: int = 0, masks: str = "free") -> dict:
    """Held-out numbers: diffusion sample (GP and white noise), regression mean, bicubic (+ back-projection) / Telea.
    The samples go through `finish` as in the pipeline (model.refine, then the data consistency); the regression mean
    without the refiner (trained on samples, not on mu: the row is what the regression-only model restores); sr:
    `lr_rmse` is the RMS of downsample(restored) - low-res input (0 = consistent with the input); `phase_excess`: the
    largest gap between the restoration's and the truth's phase_profile (cell-periodic structure at any offset in the
    cell, which blockiness, at the borders only, can miss)."""
    g = torch.Generator().manual_seed(seed)
    inp, mask, degraded = model_batch(model.task, views, g, masks=masks)
    cond = model.condition(inp, mask)
    mu = model.decode(cond[:, : model.latent_channels])
    shape = (views.shape[0], model.latent_channels, views.shape[-2] // model.factor, views.shape[-1] // model.factor)
    scale = SR_FACTORS.get(model.task)
    low = degrade.downsample(views, scale) if scale else None

    def finish(img, refine=True):  # what tasks/decode.py does: refine, then back-projection (sr) or paste the known pixels
        img = model.refine(img) if refine else img
        if low is not None:
            return degrade.back_project(img, low, scale)
        return mask * img + (1 - mask) * views

    def stats(img, prefix):
        out = {f"{prefix}psnr": float(psnr(img, views).mean()),
               f"{prefix}grad_ratio": float((mean_gradient(img) / mean_gradient(views)).mean()),
               f"{prefix}blockiness": float(blockiness(img, views))}
        out[f"{prefix}phase_excess"] = float((phase_profile(img) - phase_profile(views)).abs().max())
        if low is not None:
            out[f"{prefix}lr_rmse"] = float((degrade.downsample(img, scale) - low).pow(2).mean().sqrt())
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
    res.update(stats(finish(mu, refine=False), "regression_"))  # the regression mean as sr8-reg restores it (no refiner)
    if scale:
        bic = degraded
        res.update(stats(bic, "bicubic_"))
        res.update(stats(degrade.back_project(bic, low, scale), "bicubic_bp_"))
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
    inp, mask, degraded = model_batch(task, views, g, masks=masks)
    out = model.decode(model.predict(inp, mask))
    res = {}
    if task in SR_FACTORS:
        s = SR_FACTORS[task]
        low = degrade.downsample(views, s)
        pairs = {"regression": degrade.back_project(out, low, s), "regression_raw": out, "bicubic": degraded,
                 "bicubic_bp": degrade.back_project(degraded, low, s)}
    else:
        pairs = {"regression": mask * out + (1 - mask) * views, "telea": telea_inpaint(degraded, mask)}
    for k, img in pairs.items():
        res[k] = {"psnr": round(float(psnr(img, views).mean()), 3), "grad_ratio": round(float((mean_gradient(img) / mean_gradient(views)).mean()), 3),
                  "blockiness": round(float(blockiness(img, views)), 3)}
        if mask is not None:
            res[k]["hole_psnr"] = round(float(psnr(img, views, mask).mean()), 3)
    print(json.dumps(res), flush=True)
    return res


@torch.no_grad()
def stage_tune(task: str, noise: str, ckpt: Path, sigmas: list[float], eval_steps: int, weights: str = "ema") -> list:
    """Sampling schedules on the validation views: for each sigma_max, the truncated schedule starting at the
    regression mean (and the full one from pure noise at 10) -> rows of psnr / grad_ratio / blockiness."""
    views = validation_views()
    rows = []
    for smax in sigmas:
        schedule = {"sigma_max": smax, "start": "regression"} if smax < 10 else {"sigma_max": smax}
        model, _ = assemble(task, noise, ckpt, weights, schedule)
        masks = ("free", "scratch") if task == "inpaint" else ("free",)
        for m in masks:
            res, _ = evaluate_residual(model, views, eval_steps, masks=m)
            keep = ("psnr", "grad_ratio", "blockiness", "hole_psnr", "regression_psnr", "regression_hole_psnr",
                    "bicubic_bp_psnr", "telea_hole_psnr", "mismatch_psnr", "mismatch_hole_psnr")
            row = {"sigma_max": smax, "masks": m, **{k: round(v, 3) for k, v in res.items() if k in keep}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    (ckpt / f"{task}-{noise}").mkdir(parents=True, exist_ok=True)
    (ckpt / f"{task}-{noise}" / "tune.json").write_text(json.dumps(rows))  # what `save` puts into the card
    return rows


def stage_save(task: str, noise: str, ckpt: Path, out: Path, eval_steps: int, weights: str = "ema",
               schedule: dict | None = None) -> dict:
    from storage.models import save_model

    model, card = assemble(task, noise, ckpt, weights, schedule)
    if schedule:
        tuned = ckpt / f"{task}-{noise}" / "tune.json"
        twin = ckpt / f"{task}-gp" / "tune.json"  # a white model takes the schedule chosen for its GP twin
        source = tuned if tuned.exists() else twin if twin.exists() else None
        card["schedule"] = {**schedule, "steps_from": "the pipeline's --steps (Karras, rho 7, sigma_max -> sigma_min)",
                            "chosen_on": f"validation photographs {', '.join(train_data.VAL)} (4 views each, never "
                                         "trained on, not the test views below): `--stage tune`",
                            "validation_of": None if source is None else f"{task}-res-{source.parent.name.split('-')[-1]}",
                            "validation": json.loads(source.read_text()) if source else None}
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
    p.add_argument("--stage", required=True, choices=["ae", "import", "reg", "evalreg", "diff", "tune", "refine", "save"])
    p.add_argument("--task", default="sr8", choices=list(TASKS))
    p.add_argument("--from", dest="source", default=None, help="import: a shipped model directory (assets/models/NAME)")
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
    p.add_argument("--sigma-max", type=float, default=10.0, help="save: the card's sigma_max; below 10 the schedule "
                   "is truncated and starts at the regression mean (card start = 'regression')")
    p.add_argument("--tune-sigmas", default="0.05,0.1,0.15,0.2,0.3", help="tune: sigma_max values to compare")
    p.add_argument("--p-mean", type=float, default=-1.2, help="diff: mean of ln sigma in training (EDM P_mean)")
    p.add_argument("--p-std", type=float, default=1.2, help="diff: std of ln sigma in training (EDM P_std)")
    p.add_argument("--block-weight", type=float, default=0.0, help="diff: weight of the decoded prediction's blockiness")
    p.add_argument("--pool", type=int, default=300, help="refine: batches of sampler outputs to train on (drawn once)")
    p.add_argument("--phase-weight", type=float, default=0.5, help="refine: weight of the cell-periodic structure loss")
    p.add_argument("--energy-weight", type=float, default=10.0, help="refine: weight of keeping the sample's detail energy")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = Path(a.ckpt_dir)
    if a.stage == "ae":
        stage_ae(ckpt, a.steps, a.seed)
    elif a.stage == "import":
        if not a.source:
            raise SystemExit("--stage import needs --from assets/models/NAME")
        stage_import(Path(a.source), a.task, None if a.noise == "none" else a.noise, ckpt, a.seed)
    elif a.stage == "reg":
        stage_reg(a.task, ckpt, a.steps, a.seed, a.resume, a.time_limit, a.batch, a.crop, a.lr or 1e-3, stop_at=a.stop_at)
    elif a.stage == "evalreg":
        for masks in (("free", "scratch") if a.task == "inpaint" else ("free",)):
            stage_evalreg(a.task, ckpt, masks)
    elif a.stage == "diff":
        stage_diff(a.task, a.noise, ckpt, a.steps, a.seed, a.resume, a.time_limit, a.batch, a.crop, a.lr or 5e-4,
                   stop_at=a.stop_at, p_mean=a.p_mean, p_std=a.p_std, block_weight=a.block_weight)
    elif a.stage == "refine":
        schedule = {"sigma_max": a.sigma_max, "start": "regression"} if a.sigma_max < 10 else None
        stage_refine(a.task, a.noise, ckpt, a.steps, a.seed, a.resume, a.time_limit, schedule, a.batch, a.crop,
                     a.lr or 5e-4, a.pool, a.phase_weight, a.energy_weight, stop_at=a.stop_at)
    elif a.stage == "tune":
        stage_tune(a.task, a.noise, ckpt, [float(v) for v in a.tune_sigmas.split(",")], a.eval_steps, a.weights)
    else:
        schedule = {"sigma_max": a.sigma_max, "start": "regression"} if a.sigma_max < 10 else None
        stage_save(a.task, a.noise, ckpt, Path(a.out), a.eval_steps, a.weights, schedule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
