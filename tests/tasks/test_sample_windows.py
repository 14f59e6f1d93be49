"""The sample stage in temporal windows: same latents as one pass, committed window by window, resumable after kill -9."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from ops import degrade, flow, noise_warp
from tasks import sample as sample_stage
from tasks._stage import store_for

MODEL = "sr8-gp"
KEYS = dict(noise="noise0", encode="enc0", flow="flow0")


def write_inputs(work_root: str, frames: int = 8, size: int = 64) -> None:
    """noise / encode / estimate_flow artifacts of a real rendered clip (moving photo) for the embedded sr8 model."""
    from storage.sample import render_sample_frames
    from tasks.models import get_model

    model = get_model(MODEL)
    f = model.factor
    clip = torch.from_numpy(render_sample_frames(frames, size)).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
    with torch.no_grad():
        cond = model.condition(degrade.upsample(degrade.downsample(clip, f), f))  # (F, 32, h, w)
    fwd, bwd = flow.synthetic_flows(size, size, frames, flow.translation_matrix(1.5, 0.5))
    valid = flow.occlusion_mask(fwd, bwd)
    lfwd, lbwd, lvalid = flow.pixel_to_latent_flow(fwd, f), flow.pixel_to_latent_flow(bwd, f), flow.pixel_to_latent_mask(valid, f)
    noise = noise_warp.warp_noise("gp", np.random.default_rng(0), (frames, model.latent_channels, size // f, size // f), backward=lbwd)
    store = store_for(work_root, {})
    store.write("generate_noise", KEYS["noise"], xr.Dataset({"noise": (("frame", "c", "ly", "lx"), noise.numpy())}))
    store.write("encode", KEYS["encode"], xr.Dataset({"cond_latents": (("frame", "c", "ly", "lx"), cond.numpy())}))
    pair, lpair = ("pair", "y", "x", "xy"), ("pair", "ly", "lx", "xy")
    store.write("estimate_flow", KEYS["flow"], xr.Dataset({
        "forward": (pair, fwd.float().numpy()), "valid": (pair[:3], valid.numpy()),
        "latent_forward": (lpair, lfwd.float().numpy()), "latent_valid": (lpair[:3], lvalid.numpy())}))


def sample_key(steps: int, guidance: float, space: str = "latent", tile=None) -> str:
    """The sample stage's content key of these inputs (KEYS) and settings."""
    args = {"model": MODEL, "steps": steps, "guidance": guidance, "guidance_space": space, "tile": tile}
    return sample_stage.STAGE.key(args, {"generate_noise": KEYS["noise"], "encode": KEYS["encode"], "estimate_flow": KEYS["flow"]})


def request(work_root: str, space: str = "latent", steps: int = 4, tile=None, guidance=1.0, **kw) -> dict:
    key = sample_key(steps, guidance, space, tile)
    return dict(work_root=work_root, storage_options={}, key=key, steps=steps, guidance=guidance, guidance_space=space,
                tile=tile, **KEYS, **kw)


def latents(work_root: str, key: str) -> torch.Tensor:
    return torch.from_numpy(store_for(work_root, {}).open("sample", key)["latents"].values)


@pytest.fixture(scope="module")
def worker():
    return sample_stage.SamplerWorker(MODEL, device="cpu")


@pytest.mark.parametrize("space, guidance", [("latent", 1.0), ("pixel", 1.0), ("latent", 0.0)])
def test_windowed_stage_equals_whole_video_and_reports_ticks_across_windows(tmp_path, worker, space, guidance):
    roots = {name: str(tmp_path / name) for name in ("whole", "windowed")}
    for root in roots.values():
        write_inputs(root, frames=6)
    whole = worker.sample(**request(roots["whole"], space, steps=3, guidance=guidance))
    seen = []
    worker._external_callback = seen.append
    try:
        rec = worker.sample(**request(roots["windowed"], space, steps=3, guidance=guidance, window=2))
    finally:
        worker._external_callback = None
    assert rec["key"] == whole["key"]  # the window is an execution choice, not part of the result's identity
    assert rec["extra"] == {"windows": 3, "windows_computed": [0, 1, 2]}
    a, b = latents(roots["whole"], whole["key"]), latents(roots["windowed"], rec["key"])
    assert a.shape == (6, 32, 8, 8) and (a - b).abs().max() <= 1e-5 * a.abs().max()
    # progress: one tick per wavefront tick of every window (2 frames + 3 steps - 1; unguided: one per step), in order
    per_window = 4 if guidance > 0 else 3
    ticks = [s["tick"] for s in seen]
    assert ticks == list(range(1, 3 * per_window + 1)) and all(s["total_ticks"] == 3 * per_window for s in seen)
    assert [s["frames_done"] for s in seen][-1] == 6
    assert not list(Path(roots["windowed"], sample_stage.WINDOW_STAGE).glob("*.zarr"))  # windows removed once published


def test_tile_is_part_of_the_sample_key():
    keys = {sample_key(4, 1.0, "latent", tile) for tile in (None, 16, 32)}
    assert len(keys) == 3
    # an execution choice is not: windows, the batch bound, the device and the executor
    args = {"model": MODEL, "steps": 4, "guidance": 1.0, "guidance_space": "latent", "tile": None}
    upstream = {"generate_noise": "n", "encode": "e", "estimate_flow": "f"}
    same = {sample_stage.STAGE.key({**args, **extra}, upstream)
            for extra in ({}, {"window": 2}, {"max_batch": 3}, {"device": "cuda"}, {"executor": "ray"})}
    assert len(same) == 1


_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks import sample as sample_stage
    from tests.tasks.test_sample_windows import MODEL, request

    root, mode = sys.argv[1], sys.argv[2]
    worker = sample_stage.SamplerWorker(MODEL, threads=1, device="cpu")
    if mode == "block":
        def block_after_two_windows(info):
            if len(list(Path(root, sample_stage.WINDOW_STAGE).glob("*.zarr/_COMPLETE"))) >= 2:
                print("TWO-WINDOWS-COMMITTED", flush=True)
                time.sleep(600)
        worker._external_callback = block_after_two_windows
    rec = worker.sample(**request(root, window=2))
    print("EXTRA", rec["extra"], flush=True)
""")


def _child(root: str, mode: str) -> subprocess.Popen:
    """A fresh process sampling `root` in windows of 2 frames (threads=1, so every run does the same arithmetic)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _CHILD, root, mode], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _run(root: str) -> str:
    child = _child(root, "run")
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out
    return out


@pytest.mark.slow
def test_sigkill_in_window_three_resumes_at_window_three_with_identical_output(tmp_path):
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    write_inputs(killed)
    write_inputs(clean)
    child = _child(killed, "block")
    try:
        for line in child.stdout:  # the child blocks inside window 3, right after windows 1 and 2 are committed
            if "TWO-WINDOWS-COMMITTED" in line:
                break
        else:
            pytest.fail(f"the child ended before committing two windows (rc {child.wait()})")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    key = request(killed)["key"]
    store = store_for(killed, {})
    committed = sorted(p.parent.name for p in Path(killed, sample_stage.WINDOW_STAGE).glob("*.zarr/_COMPLETE"))
    assert committed == [f"{key}-0-2.zarr", f"{key}-2-4.zarr"] and not store.exists("sample", key)
    out = _run(killed)  # the rerun recomputes windows 3 and 4 only
    assert "EXTRA {'windows': 4, 'windows_computed': [2, 3]}" in out, out
    out = _run(clean)  # an uninterrupted run of the same request
    assert "EXTRA {'windows': 4, 'windows_computed': [0, 1, 2, 3]}" in out, out
    assert torch.equal(latents(killed, key), latents(clean, key))


@pytest.mark.gpu
@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_stage_on_cuda_matches_cpu_with_windows_and_tiles(tmp_path, worker, space):
    """The embedded model samples on CUDA, in windows and tiles, to the CPU's numbers (fp32, TF32 aside)."""
    roots = {name: str(tmp_path / name) for name in ("cpu", "cuda")}
    for root in roots.values():
        write_inputs(root, frames=5, size=128)
    cpu = worker.sample(**request(roots["cpu"], space, steps=4, tile=8, window=2))
    cuda = sample_stage.SamplerWorker(MODEL, device="cuda").sample(**request(roots["cuda"], space, steps=4, tile=8, window=2))
    a, b = latents(roots["cpu"], cpu["key"]), latents(roots["cuda"], cuda["key"])
    assert store_for(roots["cuda"], {}).open("sample", cuda["key"]).attrs["device"] == "cuda"
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()
