"""Stage estimate_flow: optical flow between consecutive conditioning frames (OpenCV DIS or Farneback), frame
pairs in parallel with Dask; forward-backward occlusion masks; chained positions; latent-grid flows."""

from __future__ import annotations

import cv2
import dask
import numpy as np
import torch
import xarray as xr
from prefect import task

from ops import flow as flowops
from tasks._stage import StageRecord, retry_on_io_error, run_stage, stage_key, store_for

FACTOR = 8


def flow_key(prepare: str, backend: str, factor: int = FACTOR) -> str:
    return stage_key("estimate_flow", {"backend": backend, "factor": factor}, {"prepare": prepare})


def pair_flow(src: np.ndarray, dst: np.ndarray, backend: str) -> np.ndarray:
    """Flow from grey uint8 `src` to `dst`: pixel x of src is at x + flow(x) in dst -> (H, W, 2) float32."""
    if backend == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return dis.calc(src, dst, None)
    return cv2.calcOpticalFlowFarneback(src, dst, None, 0.5, 4, 21, 5, 7, 1.5, 0)


def estimate(frames: np.ndarray, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """(F, H, W, 3) uint8 -> forward (F-1, H, W, 2) (j-1 -> j) and backward (F-1, H, W, 2) (j -> j-1).

    `shift:DX,DY` is the exact flow of a known translation per frame (the paper's shift experiments).
    """
    if backend.startswith("shift:"):
        dx, dy = (float(v) for v in backend[len("shift:") :].split(","))
        f, h, w = frames.shape[:3]
        fwd, bwd = flowops.synthetic_flows(h, w, f, flowops.translation_matrix(dx, dy), dtype=torch.float32)
        return fwd.numpy(), bwd.numpy()
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    jobs = [dask.delayed(pair_flow)(grey[j - 1], grey[j], backend) for j in range(1, len(grey))]
    jobs += [dask.delayed(pair_flow)(grey[j], grey[j - 1], backend) for j in range(1, len(grey))]
    results = dask.compute(*jobs, scheduler="threads")
    n = len(grey) - 1
    return np.stack(results[:n]), np.stack(results[n:])


def compute(prepared: xr.Dataset, backend: str, factor: int = FACTOR) -> xr.Dataset:
    cond = prepared["cond"].values  # (F, H, W, 3)
    forward, backward = estimate(cond, backend)
    fwd, bwd = torch.from_numpy(forward), torch.from_numpy(backward)
    valid = flowops.occlusion_mask(fwd, bwd)  # (F-1, H, W) on frame j-1's grid
    positions = flowops.chain_positions(bwd.double())  # (F, H, W, 2) in frame 0
    lfwd = flowops.pixel_to_latent_flow(fwd, factor)  # factor: the model's latent factor (its VAE's)
    lbwd = flowops.pixel_to_latent_flow(bwd, factor)
    lvalid = flowops.pixel_to_latent_mask(valid, factor)
    lpositions = flowops.chain_positions(lbwd.double())  # (F, h, w, 2) latent positions in frame 0
    dims, ldims = ("pair", "y", "x", "xy"), ("pair", "ly", "lx", "xy")
    return xr.Dataset(
        {
            "forward": (dims, forward),
            "backward": (dims, backward),
            "valid": (dims[:3], valid.numpy()),
            "positions": (("frame", "y", "x", "xy"), positions.float().numpy()),
            "latent_forward": (ldims, lfwd.numpy()),
            "latent_backward": (ldims, lbwd.numpy()),
            "latent_valid": (ldims[:3], lvalid.numpy()),
            "latent_positions": (("frame", "ly", "lx", "xy"), lpositions.numpy()),
        },
        attrs={"backend": backend, "factor": factor},
    )


@task(name="estimate_flow", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io_error)
def estimate_flow(work_root: str, storage_options: dict, key: str, prepare: str, backend: str, factor: int = FACTOR) -> StageRecord:
    store = store_for(work_root, storage_options)
    return run_stage(store, "estimate_flow", key, lambda: compute(store.open("prepare", prepare).load(), backend, factor))
