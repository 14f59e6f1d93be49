"""Stage decode: clean latents -> restored frames (frame, y, x, rgb) uint8, cropped to the output size.

Sizes: the latents cover the model-padded grid (Hp, Wp) (see tasks/encode.py); decoding crops them to the
prepared frames' size (H, W), applies the data consistency there (sr8: back-projection onto the low-res input;
inpainting: the known pixels pasted back), then crops to the output size (attrs height/width). Streamed: latents
are read, decoded and written in batches.
"""

from __future__ import annotations

import numpy as np
import torch
from prefect import task

from ops import degrade
from storage.artifacts import frame_slices
from tasks._stage import StageRecord, batch_frames, retry_on_io_error, run_stage_chunked, stage_key, store_for
from tasks.models import get_model, model_identity
from tasks.prepare import SR_FACTORS

MODEL_BATCH = 8  # frames per model call


def decode_key(sample: str, prepare: str, model: str, dtype: str = "float32") -> str:
    params = {"model": model_identity(model)}
    if dtype != "float32":
        params["dtype"] = dtype
    return stage_key("decode", params, {"sample": sample, "prepare": prepare})


def _float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)


def produce(writer, latents, prepared, model_name: str, device: str = "cpu", dtype: str = "float32") -> None:
    """latents (F, C, h, w) lazy, prepared: the prepare artifact (lazy) -> `frames` (F, out_h, out_w, 3) uint8."""
    model = get_model(model_name, device, dtype)
    device = next(model.parameters()).device
    frames = int(latents.shape[0])
    height, width = (int(n) for n in prepared["cond"].shape[1:3])  # the prepared (unpadded) grid
    out_h, out_w = int(prepared.attrs["height"]), int(prepared.attrs["width"])
    sr = prepared.attrs.get("task") in SR_FACTORS and "input" in prepared
    writer.create("frames", ("frame", "y", "x", "rgb"), (frames, out_h, out_w, 3), np.uint8)
    batch = min(MODEL_BATCH, batch_frames(height * width * 3 * 4))
    for s in frame_slices(frames, batch):
        with torch.no_grad():
            z = torch.from_numpy(np.asarray(latents[s])).to(device)  # (B, C, h, w)
            images = model.decode(z).clamp(0, 1).float().cpu()[:, :, :height, :width]  # (B, 3, H, W)
        if sr:  # output, downsampled, reproduces the input
            low = _float(prepared["input"][s].values)  # (B, 3, H/s, W/s)
            images = degrade.back_project(images, low, height // low.shape[-2])
        if "mask" in prepared:  # inpainting keeps the known pixels exactly: only holes are generated
            known = 1.0 - torch.from_numpy(prepared["mask"][s].values)[:, None].float()
            images = known * _float(prepared["cond"][s].values) + (1 - known) * images
        out = (images * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()[:, :out_h, :out_w]
        writer.write("frames", s.start, out)


@task(name="decode", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io_error)
def decode(work_root: str, storage_options: dict, key: str, sample: str, prepare: str, model_name: str, device: str = "cpu",
           dtype: str = "float32") -> StageRecord:
    store = store_for(work_root, storage_options)

    def produce_from_store(writer):
        produce(writer, store.open("sample", sample)["latents"].data, store.open("prepare", prepare), model_name, device, dtype)

    return run_stage_chunked(store, "decode", key, produce_from_store)
