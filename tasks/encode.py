"""Stage encode: conditioning frames (and masks) -> conditioning latents (frame, c, ly, lx)."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from prefect import task

from tasks._stage import StageRecord, retry_on_io_error, run_stage, stage_key, store_for
from tasks.models import get_model, model_identity

BATCH = 8


def encode_key(prepare: str, model: str, dtype: str = "float32") -> str:
    params = {"model": model_identity(model)}
    if dtype != "float32":  # reduced precision changes the latents; float32 keys stay as they were
        params["dtype"] = dtype
    return stage_key("encode", params, {"prepare": prepare})


def compute(prepared: xr.Dataset, model_name: str, device: str = "cpu", dtype: str = "float32") -> xr.Dataset:
    model = get_model(model_name, device, dtype)
    device = next(model.parameters()).device
    source = "input" if model.task == "sr4" else "cond"  # the x4 upscaler is conditioned on the low-res frame itself
    cond = (torch.from_numpy(prepared[source].values).permute(0, 3, 1, 2).float() / 255.0).to(device)  # (F, 3, H, W)
    mask = torch.from_numpy(prepared["mask"].values)[:, None].float().to(device) if "mask" in prepared else None
    out = []
    with torch.no_grad():
        for s in range(0, cond.shape[0], BATCH):
            out.append(model.condition(cond[s : s + BATCH], None if mask is None else mask[s : s + BATCH]))
    latents = torch.cat(out).float().cpu().numpy()  # (F, Cc, h, w)
    return xr.Dataset({"cond_latents": (("frame", "c", "ly", "lx"), latents)}, attrs={"model": model_name})


@task(name="encode", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io_error)
def encode(work_root: str, storage_options: dict, key: str, prepare: str, model_name: str, device: str = "cpu",
           dtype: str = "float32") -> StageRecord:
    store = store_for(work_root, storage_options)
    return run_stage(store, "encode", key, lambda: compute(store.open("prepare", prepare).load(), model_name, device, dtype))
