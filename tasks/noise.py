"""Stage generate_noise: the initial noise of every frame (frame, c, ly, lx) by the chosen warping method.

Shots: every shot the flow stage found (`shot`, (frame,) int) is noised as a clip of its own with its own
generator (`shot_rng`: shot 0 uses the seed itself, so a clip without cuts is unchanged), so a cut starts a fresh,
independent GP chain. Streamed: `gp` evaluates one GP draw per shot at each batch's positions (the same RFF
features are drawn again from the shot's seed for every batch), `fixed` repeats one map, `resample` draws batch
after batch from one generator (the same stream as one draw). The sequential baselines (`nearest`, `bilinear`,
`integral`) warp frame after frame and hold one shot's latent flows and noise (latent grid only).
"""

from __future__ import annotations

import numpy as np
import torch

from ops import noise_warp
from storage.artifacts import frame_slices
from tasks._stage import Stage, batch_frames

STREAMED = ("gp", "fixed", "resample")


def shot_rng(seed: int, shot: int) -> np.random.Generator:
    """The generator of one shot: the seed itself for shot 0, an independent stream (seed, shot) after a cut."""
    return np.random.default_rng(seed if shot == 0 else [seed, shot])


def shot_ranges(shots: np.ndarray) -> list[tuple[int, int, int]]:
    """(shot, start, stop) of each run of equal shot indices in a (F,) array."""
    starts = [0] + [j for j in range(1, len(shots)) if shots[j] != shots[j - 1]]
    stops = starts[1:] + [len(shots)]
    return [(int(shots[a]), a, b) for a, b in zip(starts, stops)]


def produce(writer, flows, method: str, seed: int, channels: int, base: str) -> None:
    """flows: the estimate_flow artifact (lazy) -> `noise` (F, C, h, w) float32 written batch by batch."""
    lpos = flows["latent_positions"].data  # (F, h, w, 2), lazy
    frames, h, w = (int(n) for n in lpos.shape[:3])
    shots = flows["shot"].values if "shot" in flows else np.zeros(frames, np.int32)
    base = base if method != "integral" else "white"
    writer.create("noise", ("frame", "c", "ly", "lx"), (frames, channels, h, w), np.float32)
    batch = batch_frames(channels * h * w * 4 * 4)
    for shot, start, stop in shot_ranges(shots):
        rng = shot_rng(seed, shot)
        if method not in STREAMED:
            n = stop - start
            noise = noise_warp.warp_noise(
                method, rng, (n, channels, h, w), base=base,
                backward=torch.from_numpy(flows["latent_backward"][start : stop - 1].values).double(),
                forward=torch.from_numpy(flows["latent_forward"][start : stop - 1].values).double())  # (n, C, h, w)
            writer.write("noise", start, noise.numpy())
            continue
        fixed = noise_warp.warp_noise("fixed", rng, (1, channels, h, w), base=base) if method == "fixed" else None
        for s in frame_slices(stop - start, batch):
            a, b = start + s.start, start + s.stop
            if method == "gp":
                positions = torch.from_numpy(np.asarray(lpos[a:b]))  # (B, h, w, 2) in the shot's first frame
                noise = noise_warp.warp_noise("gp", shot_rng(seed, shot), (b - a, channels, h, w), positions=positions)
            elif method == "fixed":
                noise = fixed.expand(b - a, -1, -1, -1)
            else:
                noise = noise_warp.warp_noise("resample", rng, (b - a, channels, h, w), base=base)
            writer.write("noise", a, noise.numpy())  # (B, C, h, w)
    writer.attrs.update({"method": method, "seed": seed, "base": base, "shots": int(shots.max()) + 1 if frames else 0})


# args: method, seed, channels (the model's latent channels), base (the model's base noise: gp or white)
STAGE = Stage("generate_noise", version="2",  # 2: a fresh GP draw per shot, streamed
              inputs=("estimate_flow",),
              identity=lambda a, _: {k: a[k] for k in ("method", "seed", "channels", "base")},
              produce=lambda store, call, writer: produce(writer, store.open("estimate_flow", call.upstream["estimate_flow"]),
                                                          *(call.args[k] for k in ("method", "seed", "channels", "base"))))
