"""Stage decode: clean latents -> restored frames (frame, y, x, rgb) uint8, cropped to the output size.

Sizes: the latents cover the model-padded grid (Hp, Wp) (see tasks/encode.py); decoding crops them to the
prepared frames' size (H, W) after the model's pixel refinement (`model.refine`: identity unless the card has a
trained refiner, applied on the model-padded grid the refiner's cells line up with), applies the data consistency there (sr8: back-projection onto the low-res input;
inpainting: the known pixels pasted back), then crops to the output size (attrs height/width). Streamed: latents
are read, decoded and written in batches.
"""

from __future__ import annotations

import numpy as np
import torch

from ops import degrade
from ops.images import to_float, to_uint8
from storage.artifacts import frame_slices
from tasks._stage import Stage, batch_frames
from tasks.degrade import SR_FACTORS
from tasks.encode import model_params
from tasks.models import get_model

MODEL_BATCH = 8  # frames per model call


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
            images = model.refine(model.decode(z)).clamp(0, 1).float().cpu()[:, :, :height, :width]  # (B, 3, H, W)
        if sr:  # output, downsampled, reproduces the input
            low = to_float(prepared["input"][s].values)  # (B, 3, H/s, W/s)
            images = degrade.back_project(images, low, height // low.shape[-2])
        if "mask" in prepared:  # inpainting keeps the known pixels exactly: only holes are generated
            known = 1.0 - torch.from_numpy(prepared["mask"][s].values)[:, None].float()
            images = known * to_float(prepared["cond"][s].values) + (1 - known) * images
        out = to_uint8(images)[:, :out_h, :out_w]  # images are in [0, 1] already: the clamp changes nothing
        writer.write("frames", s.start, out)


def _produce(store, call, writer) -> None:
    a = call.args
    produce(writer, store.open("sample", call.upstream["sample"])["latents"].data, store.open("prepare", call.upstream["prepare"]),
            a["model"], a.get("device", "cpu"), a.get("dtype", "float32"))


# args: model, dtype, device (not in the key)
STAGE = Stage("decode", version="4",  # 2: sr8 back-projection onto the low-res input; 3: crops the model's padding, streamed; 4: model.refine (pixel refiner) before back-projection
              inputs=("sample", "prepare"), identity=model_params, produce=_produce)
