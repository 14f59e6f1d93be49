"""Stage prepare (the DESIGN's `degrade`): build the model's conditioning frames, masks and, in benchmark mode,
the ground truth. Frame sizes are padded (reflect) to multiples of the latent factor and cropped back at decode.

sr8, restore:    input = low-res video (h, w)     -> cond = bicubic x8 (8h, 8w)
sr8, benchmark:  input = ground truth (H, W)      -> low-res = antialiased bicubic /8, cond = bicubic x8, truth
sr4: the same with 4 (the x4 upscaler layout; its encode stage conditions on `input`, the low-res frame)
inpaint, restore:   input + mask URL (white = hole) -> cond = input with holes, mask
inpaint, benchmark: input = ground truth           -> masks generated from the seed, cond = masked truth, truth
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from prefect import task

from ops import degrade
from storage.video import VideoError, pad_to_multiple, read_video
from tasks._stage import StageRecord, retry_on_io_error, run_stage, stage_key, store_for

FACTOR = 8
SR_FACTORS = {"sr8": 8, "sr4": 4}  # super-resolution tasks: output size / input size


def prepare_key(extract: str, task_name: str, mode: str, seed: int, mask_ident: str | None) -> str:
    return stage_key("prepare", {"task": task_name, "mode": mode, "seed": seed, "mask": mask_ident}, {"extract_frames": extract})


def _to_float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # (F, 3, H, W)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (F, H, W, 3)


def load_mask(url: str, frames: int, height: int, width: int, storage_options=None) -> np.ndarray:
    """Mask image or video -> (F, H, W) bool (True = hole); a size mismatch is a clear error."""
    import fsspec
    import cv2

    lower = url.lower()
    if lower.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = np.frombuffer(f.read(), np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise VideoError(f"{url}: cannot decode the mask image; use a PNG with white = hole")
        masks = np.repeat(image[None], frames, axis=0)
    else:
        video, _ = read_video(url, storage_options=storage_options)
        masks = video.mean(-1)
        if masks.shape[0] < frames:
            raise VideoError(f"{url}: mask video has {masks.shape[0]} frames, the input has {frames}; give one mask per frame or a single image")
        masks = masks[:frames]
    if masks.shape[1:] != (height, width):
        raise VideoError(
            f"{url}: mask size {masks.shape[2]}x{masks.shape[1]} does not match the video's {width}x{height}; "
            "resize the mask to the video's frame size"
        )
    return masks > 127


def compute(extracted: xr.Dataset, task_name: str, mode: str, seed: int, mask_url, storage_options) -> xr.Dataset:
    frames = extracted["frames"].values  # (F, H, W, 3) uint8
    f, h, w, _ = frames.shape
    data, attrs = {}, {"task": task_name, "mode": mode}
    if task_name in SR_FACTORS:
        scale = SR_FACTORS[task_name]
        if mode == "benchmark":
            truth, (ph, pw) = pad_to_multiple(frames, FACTOR)
            low = degrade.downsample(_to_float(truth), scale)  # (F, 3, H/s, W/s)
            data["truth"] = (("frame", "y", "x", "rgb"), truth)
            attrs.update(height=h, width=w)
        else:
            low = _to_float(frames)
            attrs.update(height=h * scale, width=w * scale)
        cond = degrade.upsample(low, scale)  # (F, 3, H, W)
        data["input"] = (("frame", "ly", "lx", "rgb"), _to_uint8(low))
        data["cond"] = (("frame", "y", "x", "rgb"), _to_uint8(cond))
    else:
        padded, (ph, pw) = pad_to_multiple(frames, FACTOR)
        if mode == "benchmark":
            gen = torch.Generator().manual_seed(seed)
            mask = degrade.random_masks(gen, 1, padded.shape[1], padded.shape[2]).expand(f, -1, -1, -1)  # (F, 1, H, W)
            data["truth"] = (("frame", "y", "x", "rgb"), padded)
        else:
            holes = load_mask(mask_url, f, h, w, storage_options)
            holes = np.pad(holes, ((0, 0), (0, padded.shape[1] - h), (0, padded.shape[2] - w)), mode="edge")
            mask = torch.from_numpy(holes)[:, None].float()
        masked = degrade.apply_mask(_to_float(padded), mask)
        data["cond"] = (("frame", "y", "x", "rgb"), _to_uint8(masked))
        data["input"] = data["cond"]
        data["mask"] = (("frame", "y", "x"), mask[:, 0].numpy().astype(np.uint8))
        attrs.update(height=h, width=w)
    return xr.Dataset(data, attrs=attrs)


@task(name="prepare", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io_error)
def prepare(work_root: str, storage_options: dict, key: str, extract: str, task_name: str, mode: str, seed: int, mask_url) -> StageRecord:
    store = store_for(work_root, storage_options)
    return run_stage(store, "prepare", key, lambda: compute(store.open("extract_frames", extract).load(), task_name, mode, seed, mask_url, storage_options))
