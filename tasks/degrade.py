"""Stage `prepare` (the DESIGN's `degrade`; the stage keeps its name, so existing artifacts stay valid): build the model's conditioning frames, masks and, in benchmark mode,
the ground truth. Frame sizes are padded (reflect, bottom/right) to the model's own multiple (latent factor x the
denoiser's downsampling, `tasks.models.pad_multiple`) and cropped back at decode.

sr8, restore:    input = low-res video (h, w)     -> cond = bicubic x8 (8h, 8w)   (sr4: the same with 4)
sr8, benchmark:  input = ground truth (H, W)      -> low-res = antialiased bicubic /8, cond = bicubic x8, truth
sr4: the same with 4 (the x4 upscaler layout; its encode stage conditions on `input`, the low-res frame)
inpaint, restore:   input + mask URL (white = hole) -> cond = input with holes, mask
inpaint, benchmark: input = ground truth           -> holes of --mask, else generated from the seed; cond = masked truth, truth
deblur / denoise, restore:   input = the degraded video -> cond = input (no mask)
deblur / denoise, benchmark: input = ground truth -> cond = ops.operators.deblur / denoise of it (DEGRADATIONS, noise
                             drawn per frame from (seed, frame index), so chunking does not change it), truth

`measurement(task, prepared, frames)` gives the zero-shot solvers their y and pixel-space operator A for the same task.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr

from ops import degrade
from ops import operators
from ops.images import to_float, to_uint8
from storage.video import VideoError, pad_to_multiple, read_video
from tasks._stage import Stage

SR_FACTORS = {"sr8": 8, "sr4": 4}  # super-resolution tasks: output size / input size (a property of the task)


# The mask-free degradations (benchmark mode) and their forward models: blur kernel and noise std in [0, 1] pixels.
DEGRADATIONS = {"deblur": {"kernel_size": 9, "kernel_std": 2.0, "noise": 0.01}, "denoise": {"noise": 0.1}}


def deblur_kernel(task_name: str = "deblur") -> torch.Tensor:
    """The deblur task's Gaussian kernel (k, k) float32."""
    p = DEGRADATIONS[task_name]
    return operators.gaussian_kernel(p["kernel_size"], p["kernel_std"]).float()


def degrade_frames(images: torch.Tensor, task_name: str, seed: int, start: int) -> torch.Tensor:
    """Benchmark degradation of frames start.. (n, 3, H, W) in [0, 1]; frame j's noise comes from seed (seed, j)."""
    level = DEGRADATIONS[task_name]["noise"]
    out = []
    for i, frame in enumerate(images):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, start + i]).generate_state(1)[0]))
        if task_name == "deblur":
            out.append(operators.deblur(frame[None], deblur_kernel(task_name), level, g))
        else:
            out.append(operators.denoise(frame[None], level, g))
    return torch.cat(out)  # (n, 3, H, W)


def measurement(task_name: str, prepared: xr.Dataset, frames: slice, device="cpu"):
    """The zero-shot solvers' measurement of frames `frames` -> (y, A) with A(images (B, 3, H, W), rows (B,)) in
    pixels; rows index y. sr8 / sr4: y = the low-res input, A = antialiased /8 or /4; inpaint: y = known pixels, A = mask;
    deblur: y = the blurred input, A = blur with the task's kernel; denoise: y = the input, A = identity."""
    def load(name):
        return to_float(np.asarray(prepared[name].isel(frame=frames).values)).to(device)  # (F, 3, H, W)

    if task_name in SR_FACTORS:
        return load("input"), lambda x, rows: operators.downsample(x, SR_FACTORS[task_name])
    if task_name == "inpaint":
        keep = 1.0 - torch.from_numpy(np.asarray(prepared["mask"].isel(frame=frames).values)).float()[:, None].to(device)
        return load("cond") * keep, lambda x, rows: operators.mask(x, keep[rows])
    if task_name == "deblur":
        kernel = deblur_kernel(task_name).to(device)
        return load("cond"), lambda x, rows: operators.blur(x, kernel.to(x.dtype))
    if task_name == "denoise":
        return load("cond"), lambda x, rows: x
    raise ValueError(f"task {task_name!r} has no measurement operator; expected sr8, inpaint, deblur or denoise")


def input_multiple(task_name: str, mode: str, multiple: int) -> int:
    """The input frames are reflect-padded to this so the model's frames are multiples of its `multiple`: SR restore
    pads the low-res input (the smallest m with scale * m a multiple), SR benchmark pads the truth so it also
    divides by the scale, other tasks pad to `multiple`."""
    scale = SR_FACTORS.get(task_name)
    if scale:
        return multiple // math.gcd(multiple, scale) if mode == "restore" else math.lcm(multiple, scale)
    return multiple


def output_scale(task_name: str, mode: str) -> int:
    """Output frame size / input frame size: the scale for SR restore, else 1."""
    return SR_FACTORS.get(task_name, 1) if mode == "restore" else 1


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


DIMS = {"truth": ("frame", "y", "x", "rgb"), "cond": ("frame", "y", "x", "rgb"), "mask": ("frame", "y", "x")}


def prepare_frames(frames: np.ndarray, task_name: str, mode: str, multiple: int, mask: np.ndarray | None = None,
                   seed: int = 0, start: int = 0) -> dict:
    """One chunk of frames (n, H, W, 3) uint8 -> its conditioning arrays {name: (n, ...)}: cond, input, truth
    (benchmark), mask (inpaint; `mask` (n or 1, H', W') on the padded grid, 1 = hole). seed, start: the benchmark
    noise of deblur / denoise (frame start + i draws from (seed, start + i))."""
    data = {}
    if task_name in DEGRADATIONS:
        padded, _ = pad_to_multiple(frames, input_multiple(task_name, mode, multiple))
        if mode == "benchmark":
            data["truth"] = padded
            data["cond"] = to_uint8(degrade_frames(to_float(padded), task_name, seed, start))
        else:
            data["cond"] = padded
        data["input"] = data["cond"]
    elif task_name in SR_FACTORS:
        scale = SR_FACTORS[task_name]
        if mode == "benchmark":
            truth, _ = pad_to_multiple(frames, input_multiple(task_name, mode, multiple))
            low = degrade.downsample(to_float(truth), scale)  # (n, 3, H/s, W/s)
            data["truth"] = truth
        else:
            low = to_float(pad_to_multiple(frames, input_multiple(task_name, mode, multiple))[0])  # (n, 3, h', w')
        data["input"] = to_uint8(low)
        data["cond"] = to_uint8(degrade.upsample(low, scale))  # (n, H, W, 3)
    else:
        padded, _ = pad_to_multiple(frames, input_multiple(task_name, mode, multiple))
        holes = torch.from_numpy(np.broadcast_to(mask, (len(frames), *mask.shape[1:])).astype(np.float32))[:, None]  # (n, 1, H, W)
        if mode == "benchmark":
            data["truth"] = padded
        data["cond"] = to_uint8(degrade.apply_mask(to_float(padded), holes))
        data["input"] = data["cond"]
        data["mask"] = holes[:, 0].numpy().astype(np.uint8)
    return data


def _frames_per_chunk(array) -> int:
    """Frames per stored chunk of `array` (zarr encoding or dask chunks); 1 when unknown."""
    chunks = getattr(array, "encoding", {}).get("chunks") or getattr(array, "chunks", None)
    if chunks and isinstance(chunks[0], tuple):
        return int(chunks[0][0])
    return int(chunks[0]) if chunks else 1


def compute(extracted: xr.Dataset, task_name: str, mode: str, seed: int, mask_url, storage_options, multiple: int) -> xr.Dataset:
    """`multiple`: frame sizes the model takes (tasks.models.pad_multiple); frames are reflect-padded to it.

    Streamed: the result is lazy (dask), one chunk of the extracted frames per task, so writing it to zarr reads,
    prepares and stores chunk by chunk and the video is never held whole (nor at float32 8x)."""
    import dask
    import dask.array as da

    source = extracted["frames"]  # (F, H, W, 3) uint8, lazily indexed
    f, h, w, _ = source.shape
    step = _frames_per_chunk(source)
    scale = output_scale(task_name, mode)
    attrs = {"task": task_name, "mode": mode, "height": h * scale, "width": w * scale}
    holes = None
    if task_name == "inpaint":
        m = input_multiple(task_name, mode, multiple)
        ph, pw = -(-h // m) * m, -(-w // m) * m
        if mode == "benchmark" and not mask_url:  # one mask for every frame, from the seed
            holes = degrade.random_masks(torch.Generator().manual_seed(seed), 1, ph, pw)[:, 0].numpy()  # (1, H, W), 1 = hole
        else:  # the user's holes (benchmark: cut into the clean input, scored against it)
            holes = load_mask(mask_url, f, h, w, storage_options)
            holes = np.pad(holes, ((0, 0), (0, ph - h), (0, pw - w)), mode="edge")  # (F, H, W)

    def chunk(start: int, stop: int) -> dict:
        mask = None if holes is None else (holes if len(holes) == 1 else holes[start:stop])
        return prepare_frames(np.asarray(source[start:stop]), task_name, mode, multiple, mask, seed, start)

    first = chunk(0, min(step, f))  # shapes and dtypes (and the first chunk itself)
    parts = {name: [da.from_array(a, chunks=a.shape)] for name, a in first.items()}
    for start in range(step, f, step):
        stop = min(start + step, f)
        lazy = dask.delayed(chunk, pure=True)(start, stop)
        for name, a in first.items():
            parts[name].append(da.from_delayed(lazy[name], shape=(stop - start, *a.shape[1:]), dtype=a.dtype))
    dims = {**DIMS, "input": ("frame", "ly", "lx", "rgb") if task_name in SR_FACTORS else DIMS["cond"]}
    data = {name: (dims[name], da.concatenate(p)) for name, p in parts.items()}
    return xr.Dataset(data, attrs=attrs)


def _identity(args: dict, storage_options: dict) -> dict:
    """task, mode, seed, the pad multiple and the mask file's identity (not its URL: a changed mask gets a new key)."""
    from tasks.extract import source_identity

    mask = source_identity(args["mask"], storage_options) if args.get("mask") else None
    ident = {"task": args["task"], "mode": args["mode"], "seed": args["seed"], "mask": mask, "multiple": args["multiple"]}
    if mask and args["mode"] == "benchmark":  # the user's holes (before: ignored for the seed's) - never the old artifact
        ident["holes"] = "mask"
    return ident


# args: task, mode, seed, mask (URL or None), multiple (the model's pad multiple)
STAGE = Stage("prepare", version="1", inputs=("extract_frames",), identity=_identity,
              compute=lambda store, call: compute(store.open("extract_frames", call.upstream["extract_frames"], chunks=False),
                                                  call.args["task"], call.args["mode"], call.args["seed"], call.args.get("mask"),
                                                  store.storage_options, call.args["multiple"]))
