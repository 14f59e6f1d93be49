"""Stage generate_noise: the initial noise of every frame (frame, c, ly, lx) by the chosen warping method."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from prefect import task

from ops import noise_warp
from tasks._stage import StageRecord, retry_on_io_error, run_stage, stage_key, store_for


def noise_key(flow: str, method: str, seed: int, channels: int, base: str) -> str:
    return stage_key("generate_noise", {"method": method, "seed": seed, "channels": channels, "base": base}, {"estimate_flow": flow})


def compute(flows: xr.Dataset, method: str, seed: int, channels: int, base: str) -> xr.Dataset:
    positions = torch.from_numpy(flows["latent_positions"].values)  # (F, h, w, 2)
    f, h, w, _ = positions.shape
    kwargs = {"positions": positions} if method == "gp" else {}
    noise = noise_warp.warp_noise(
        method, np.random.default_rng(seed), (f, channels, h, w),
        backward=torch.from_numpy(flows["latent_backward"].values).double(),
        forward=torch.from_numpy(flows["latent_forward"].values).double(),
        base=base if method != "integral" else "white", **kwargs,
    )  # (F, C, h, w)
    return xr.Dataset({"noise": (("frame", "c", "ly", "lx"), noise.numpy())}, attrs={"method": method, "seed": seed, "base": base})


@task(name="generate_noise", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io_error)
def generate_noise(work_root: str, storage_options: dict, key: str, flow: str, method: str, seed: int, channels: int, base: str) -> StageRecord:
    store = store_for(work_root, storage_options)
    return run_stage(store, "generate_noise", key, lambda: compute(store.open("estimate_flow", flow).load(), method, seed, channels, base))
