"""Stage estimate_flow: optical flow between consecutive conditioning frames (OpenCV DIS or Farneback), frame
pairs in parallel with Dask; forward-backward occlusion masks; shot cuts; chained positions; latent-grid flows.

Sizes: the conditioning frames (H, W) are reflect-padded at the bottom/right to the model's multiple
(`tasks.models.pad_multiple`: latent factor x the denoiser's downsampling; a no-op when prepare already padded
to it) and every array here lives on that padded grid (Hp, Wp) and its latent grid (Hp/f, Wp/f) — the grid the
encode, noise and sample stages use. Decode crops back. attrs: height/width (unpadded), padded_height/padded_width, factor, multiple, cuts.

Streaming: frames are read and written in batches (`tasks._stage.batch_frames`); the positions chained to
the first frame of each shot are carried from one batch to the next, so the result does not depend on the
batch size.

Shot cuts: a pair whose flow fails and whose colours jump (`ops.flow.is_shot_cut`) starts a new shot: its flows
are zero, its valid masks false (no guidance across the cut), positions restart at the identity, `shot`
counts up, and the noise stage draws a fresh GP for it.
"""

from __future__ import annotations

import math

import cv2
import dask
import numpy as np
import torch

from ops import flow as flowops
from storage.artifacts import frame_slices
from storage.video import pad_to_multiple
from tasks._stage import Stage, batch_frames
from tasks.models import model_geometry

# Bytes per padded pixel of one frame across this stage's arrays (flows, masks, positions in float64 while chaining).
_BYTES_PER_PIXEL = 64


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


def geometry_for(task_name: str, factor: int | None = None, multiple: int | None = None) -> dict:
    """{"factor", "multiple"} the flows are computed for. factor None: the task's default model (its card);
    multiple None: the factor itself (the prepared frames are already multiples of the model's multiple, as a
    prepare stage that pads to `tasks.models.pad_multiple` makes them)."""
    if factor is None:
        geometry = model_geometry(task_name)  # a task name resolves to its default model
        return {"factor": geometry["factor"], "multiple": multiple or geometry["multiple"]}
    return {"factor": int(factor), "multiple": int(multiple or factor)}


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `multiple`."""
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


def _create(writer, frames: int, hp: int, wp: int, factor: int) -> None:
    h, w = hp // factor, wp // factor
    pairs = frames - 1
    for name, dims, shape, dtype in (
        ("forward", ("pair", "y", "x", "xy"), (pairs, hp, wp, 2), np.float32),
        ("backward", ("pair", "y", "x", "xy"), (pairs, hp, wp, 2), np.float32),
        ("valid", ("pair", "y", "x"), (pairs, hp, wp), bool),
        ("positions", ("frame", "y", "x", "xy"), (frames, hp, wp, 2), np.float32),
        ("latent_forward", ("pair", "ly", "lx", "xy"), (pairs, h, w, 2), np.float32),
        ("latent_backward", ("pair", "ly", "lx", "xy"), (pairs, h, w, 2), np.float32),
        ("latent_valid", ("pair", "ly", "lx"), (pairs, h, w), bool),
        ("latent_positions", ("frame", "ly", "lx", "xy"), (frames, h, w, 2), np.float64),
        ("shot", ("frame",), (frames,), np.int32),
        ("valid_fraction", ("pair",), (pairs,), np.float32),
        ("hist_distance", ("pair",), (pairs,), np.float32),
    ):
        writer.create(name, dims, shape, dtype, chunk_frames=1 if len(shape) > 1 else max(1, shape[0]))


def produce(writer, cond, backend: str, geometry: dict) -> None:
    """Read `cond` (F, H, W, 3) uint8 (lazy) batch by batch and write every flow variable (see module doc)."""
    frames, height, width = (int(n) for n in cond.shape[:3])
    factor, multiple = geometry["factor"], geometry["multiple"]
    hp, wp = padded_size(height, width, multiple)
    _create(writer, frames, hp, wp, factor)
    grid = flowops.identity_grid(hp, wp, torch.float64)
    lgrid = flowops.identity_grid(hp // factor, wp // factor, torch.float64)
    prev_frame, prev_hist, prev_pos, prev_lpos, shot = None, None, grid, lgrid, 0
    cuts = []
    for s in frame_slices(frames, batch_frames(hp * wp * _BYTES_PER_PIXEL)):
        batch, _ = pad_to_multiple(np.asarray(cond[s]), multiple)  # (B, Hp, Wp, 3)
        hists = [flowops.colour_histogram(torch.from_numpy(f[:height, :width])) for f in batch]
        seq = batch if prev_frame is None else np.concatenate([prev_frame[None], batch])
        first = s.start if prev_frame is None else s.start - 1  # frame index of seq[0]
        positions, lpositions, shots = [], [], []
        if len(seq) > 1:
            forward, backward = (torch.from_numpy(np.ascontiguousarray(a)) for a in estimate(seq, backend))  # (P, Hp, Wp, 2)
            valid = flowops.occlusion_mask(forward, backward)  # (P, Hp, Wp) on frame j-1's grid
            hist_seq = ([prev_hist] if prev_frame is not None else []) + hists
            fractions = valid[:, :height, :width].float().mean((1, 2))  # (P,)
            distances = torch.tensor([flowops.histogram_distance(hist_seq[i], hist_seq[i + 1]) for i in range(len(seq) - 1)])
            cut = torch.tensor([flowops.is_shot_cut(float(v), float(d)) for v, d in zip(fractions, distances)])
            forward[cut], backward[cut], valid[cut] = 0.0, 0.0, False  # no correspondence across a cut
            lforward = flowops.pixel_to_latent_flow(forward, factor)
            lbackward = flowops.pixel_to_latent_flow(backward, factor)
            lvalid = flowops.pixel_to_latent_mask(valid, factor)
            pair0 = first  # pair index of (seq[0], seq[1]) = frame index of seq[1] minus 1
            for name, value in (("forward", forward), ("backward", backward), ("valid", valid), ("latent_forward", lforward),
                                ("latent_backward", lbackward), ("latent_valid", lvalid),
                                ("valid_fraction", fractions), ("hist_distance", distances)):
                writer.write(name, pair0, value.numpy())
        for i in range(len(seq)):
            j = first + i
            if j < s.start:
                continue  # the carried frame: its positions were written with the previous batch
            if j > 0:
                p = i - 1  # pair (j-1, j) within this batch
                if bool(cut[p]):
                    shot += 1
                    cuts.append(j)
                    prev_pos, prev_lpos = grid, lgrid
                else:
                    prev_pos = flowops.chain_step(prev_pos, backward[p].double())
                    prev_lpos = flowops.chain_step(prev_lpos, lbackward[p].double())
            positions.append(prev_pos)
            lpositions.append(prev_lpos)
            shots.append(shot)
        writer.write("positions", s.start, torch.stack(positions).float().numpy())
        writer.write("latent_positions", s.start, torch.stack(lpositions).numpy())
        writer.write("shot", s.start, np.asarray(shots, np.int32))
        prev_frame, prev_hist = batch[-1], hists[-1]
    writer.attrs.update({"backend": backend, "factor": factor, "multiple": multiple, "height": height, "width": width,
                         "padded_height": hp, "padded_width": wp, "cuts": cuts})


def _produce(store, call, writer) -> None:
    prepared = store.open("prepare", call.upstream["prepare"])
    a = call.args
    produce(writer, prepared["cond"].data, a["backend"], geometry_for(prepared.attrs["task"], a.get("factor"), a.get("multiple")))


# args: backend; factor / multiple: the sampling model's latent factor and pad multiple (see `geometry_for`; None: the
# prepared task's default model)
STAGE = Stage("estimate_flow", version="2",  # 2: padded to the model's multiple, shot cuts, streamed
              inputs=("prepare",),
              identity=lambda a, _: {"backend": a["backend"], "factor": a.get("factor"), "multiple": a.get("multiple")},
              produce=_produce)
