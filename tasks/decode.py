"""Stage decode: clean latents -> restored frames (frame, y, x, rgb) uint8, cropped to the output size."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from prefect import task

from ops import degrade
from tasks._stage import StageRecord, retry_on_io_error, run_stage, stage_key, store_for
from tasks.models import get_model, model_identity
from tasks.prepare import SR_FACTORS

BATCH = 8


def decode_key(sample: str, prepare: str, model: str) -> str:
    return stage_key("decode", {"model": model_identity(model)}, {"sample": sample, "prepare": prepare})


def compute(latents: np.ndarray, prepared: xr.Dataset, model_name: str) -> xr.Dataset:
    model = get_model(model_name)
    z = torch.from_numpy(latents)
    out = []
    with torch.no_grad():
        for s in range(0, z.shape[0], BATCH):
            out.append(model.decode(z[s : s + BATCH]).clamp(0, 1))
    images = torch.cat(out)  # (F, 3, H, W) in [0, 1]
    if prepared.attrs.get("task") in SR_FACTORS and "input" in prepared:  # output, downsampled, reproduces the input
        low = torch.from_numpy(prepared["input"].values).permute(0, 3, 1, 2).float() / 255.0  # (F, 3, h, w)
        images = degrade.back_project(images, low, SR_FACTORS[prepared.attrs["task"]])
    if "mask" in prepared:  # inpainting keeps the known pixels exactly: only holes are generated
        known = 1.0 - torch.from_numpy(prepared["mask"].values)[:, None].float()
        cond = torch.from_numpy(prepared["cond"].values).permute(0, 3, 1, 2).float() / 255.0
        images = known * cond + (1 - known) * images
    h, w = int(prepared.attrs["height"]), int(prepared.attrs["width"])
    frames = (images * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()[:, :h, :w]
    return xr.Dataset({"frames": (("frame", "y", "x", "rgb"), np.ascontiguousarray(frames))})


@task(name="decode", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io_error)
def decode(work_root: str, storage_options: dict, key: str, sample: str, prepare: str, model_name: str) -> StageRecord:
    store = store_for(work_root, storage_options)
    return run_stage(store, "decode", key, lambda: compute(store.open("sample", sample)["latents"].values, store.open("prepare", prepare).load(), model_name))
