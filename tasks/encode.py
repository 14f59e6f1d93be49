"""Stage encode: conditioning frames (and masks) -> conditioning latents (frame, c, ly, lx).

Sizes: the prepared frames (H, W) and masks are reflect-padded at the bottom/right to the model's multiple
(`tasks.models.pad_multiple`), so the latents cover the padded grid (Hp/f, Wp/f) that the flow, noise and
sample stages share; decode crops the padding off. Streamed: frames are read, encoded and written in batches.
"""

from __future__ import annotations

import numpy as np
import torch

from ops.images import to_float
from storage.artifacts import frame_slices
from storage.video import pad_to_multiple
from tasks._stage import Stage, batch_frames
from tasks.models import get_model, model_identity, model_info, pad_multiple

MODEL_BATCH = 8  # frames per model call (the autoencoder's activations, not the arrays, bound this)


def model_params(args: dict, storage_options: dict | None = None) -> dict:
    """The identity of a model stage's args (encode, decode): the model's files and, below float32, the dtype (reduced
    precision changes the numbers; float32 keys stay as they were). The device is not in it."""
    params = {"model": model_identity(args["model"])}
    if args.get("dtype", "float32") != "float32":
        params["dtype"] = args["dtype"]
    return params


def produce(writer, cond, mask, model_name: str, device: str = "cpu", dtype: str = "float32", scale: int = 1) -> None:
    """cond (F, H, W, 3) uint8 and mask (F, H, W) or None, both lazy -> `cond_latents` (F, Cc, Hp/f, Wp/f).

    scale: the model's frames are `scale` times the size of `cond` (an upscaler conditioned on the low-res frame
    itself): `cond` is then padded to the model's multiple / scale."""
    model = get_model(model_name, device, dtype)
    device = next(model.parameters()).device
    multiple = max(1, pad_multiple(model_name) // scale)
    frames, height, width = (int(n) for n in cond.shape[:3])
    batch = min(MODEL_BATCH, batch_frames(height * width * 3 * 4))
    for s in frame_slices(frames, batch):
        images, _ = pad_to_multiple(np.asarray(cond[s]), multiple)  # (B, Hp, Wp, 3)
        x = to_float(images).to(device)  # (B, 3, Hp, Wp)
        m = None
        if mask is not None:
            holes, _ = pad_to_multiple(np.asarray(mask[s])[..., None], multiple)  # (B, Hp, Wp, 1)
            m = torch.from_numpy(holes).permute(0, 3, 1, 2).float().to(device)  # (B, 1, Hp, Wp)
        with torch.no_grad():
            latents = model.condition(x, m).float().cpu().numpy()  # (B, Cc, Hp/f, Wp/f)
        if s.start == 0:
            writer.create("cond_latents", ("frame", "c", "ly", "lx"), (frames,) + latents.shape[1:], np.float32)
        writer.write("cond_latents", s.start, latents)
    writer.attrs.update({"model": model_name, "multiple": multiple, "height": height, "width": width})


def _produce(store, call, writer) -> None:
    prepared = store.open("prepare", call.upstream["prepare"])
    a = call.args
    mask = prepared["mask"].data if "mask" in prepared else None
    source = "input" if model_info(a["model"])["task"] == "sr4" else "cond"  # the x4 upscaler takes the low-res frame
    scale = int(prepared["cond"].shape[2]) // int(prepared[source].shape[2])
    produce(writer, prepared[source].data, mask, a["model"], a.get("device", "cpu"), a.get("dtype", "float32"), scale)


# args: model, dtype, device (not in the key)
STAGE = Stage("encode", version="2",  # 2: padded to the model's multiple, streamed
              inputs=("prepare",), identity=model_params, produce=_produce)
