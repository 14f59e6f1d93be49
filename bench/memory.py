"""Memory and time against clip length and frame size: peak RSS and seconds per frame of every restore-video stage
for the same 256x256 clip at 32, 128 and 512 frames, and for 256x256, 1280x720 and
1920x1080 frames (8x SR benchmark, embedded model, few steps; clips made here with PyAV).

Each clip runs every stage, one after another, in a fresh process (`--config`) started by a wrapper process
(`--measure`) that reads `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` once it has exited: `peak_rss_mb` is the
pipeline's peak (the largest of that and the per-stage peaks, since resetting VmHWM resets ru_maxrss too). Per stage:
seconds, peak RSS (VmHWM, reset before each stage, after freed memory went back to the OS) and its rise over the
stage's starting RSS; `streamed_peak_rss_mb` is the largest peak over the stages that stream frame batches.
The goal: peak RSS at 512 frames <= 1.3 x the peak at 32.

python -m bench.memory --json [--frames 32,128,512] [--sizes 256x256,1280x720,1920x1080] [--steps 2]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._util import emit, parser

ROOT = Path(__file__).resolve().parent.parent
STREAMED = ("extract_frames", "estimate_flow", "encode", "generate_noise", "decode")
STAGES = ("extract_frames", "prepare", "estimate_flow", "encode", "generate_noise", "sample", "decode", "outputs")
SIZE_SERIES_FRAMES = 4
GOAL_RATIO = 1.3
WINDOW = 16  # frames per sampling window
DEFAULT_MAX_RSS_MB = 8192  # a configuration passing this is stopped and reported, not left to the OOM killer


def make_clip(path: str, width: int, height: int, frames: int) -> str:
    """A camera pan with a slow zoom over a scikit-image photograph, H.264 with PyAV, written frame by frame."""
    import cv2
    import numpy as np
    from skimage import data

    from storage.video import write_video

    photo = data.astronaut()
    s = 2 * max(width, height, 512)
    photo = cv2.resize(photo, (s, s), interpolation=cv2.INTER_CUBIC)
    span = s - 1.3 * max(width, height)

    def frame(i: int):
        t = i / max(frames - 1, 1)
        zoom = 1.2 - 0.1 * t
        a = np.float32([[zoom, 0, 0.1 * s + t * 0.5 * span], [0, zoom, 0.1 * s + t * 0.3 * span]])
        return cv2.warpAffine(photo, a, (width, height), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REFLECT)

    return write_video(path, (frame(i) for i in range(frames)), 24)


def _calls(spec: dict) -> tuple:
    """restore()'s own stage calls for this configuration (so its final call reuses them all) -> (calls, cfg)."""
    from flows.config import RestoreConfig
    from flows.restore_video import derive_calls

    cfg = RestoreConfig(**spec["config"])
    calls, _ = derive_calls(cfg)
    return calls, cfg


def run_stage(spec: dict, stage: str) -> None:
    """One stage of restore() with its own call, in this process (`--stage`), through the stage runner (no Prefect)."""
    import numpy as np
    import torch
    import xarray as xr

    from tasks._stage import run as run_call, store_for
    from tasks.stages import STAGES as REGISTRY

    torch.set_num_threads(int(spec.get("threads", 1)))
    calls, cfg = _calls(spec)
    store = store_for(cfg.work_root, {})
    if stage == "sample":
        call = calls["sample"]
        if spec.get("skip_sampling"):  # decode then measures the noise as if it were the clean latents
            latents = store.open("generate_noise", call.upstream["generate_noise"])["noise"].values
            store.write("sample", call.key, xr.Dataset({"latents": (("frame", "c", "ly", "lx"), np.asarray(latents))}))
            return
        from tasks.sample import SamplerWorker, worker_request

        request = {**worker_request(store, call), "window": WINDOW}  # windows are not in the key
        SamplerWorker(cfg.model_name, threads=int(spec.get("threads", 1))).sample(**request)
    elif stage in calls and stage != "outputs":
        run_call(REGISTRY[stage], store, calls[stage])
    elif stage == "outputs":  # restore() itself: every stage above is reused, metrics and the videos are computed
        from flows.restore_video import restore

        os.environ["RESTORE_VIDEO_EXPERIMENT"] = "bench-memory"
        report = restore(cfg)
        missing = [s for s in STAGES[:-1] if s in (spec.get("stages") or STAGES) and s != "sample" and not report["cached"].get(s)]
        if missing and not spec.get("skip_sampling"):
            raise RuntimeError(f"restore() recomputed {missing}: bench.memory's keys no longer match restore()'s")
    else:
        raise ValueError(f"unknown stage {stage!r}")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next reading is one stage's own peak; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS: now, VmHWM: peak since the last reset), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _trim() -> None:
    """Give memory freed by the previous stage back to the OS (gc + malloc_trim), so a stage's peak is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_all_stages(spec: dict) -> dict:
    """Every stage in this process (`--config`), one after another: per-stage seconds, peak RSS (VmHWM reset
    before each stage where the kernel allows it; otherwise the running peak) and rise (peak - RSS at its start)."""
    stages, resettable = {}, True
    for stage in spec.get("stages") or STAGES:
        print(f"bench.memory stage {stage}", file=sys.stderr, flush=True)
        _trim()
        resettable = _reset_peak() and resettable
        before = _status_mb("VmRSS")
        start = time.perf_counter()
        run_stage(spec, stage)
        peak = _status_mb("VmHWM")
        stages[stage] = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": peak,
                         "rise_mb": round(peak - before, 1)}
        print(f"bench.memory done {json.dumps({stage: stages[stage]})}", file=sys.stderr, flush=True)
    return {"stages": stages, "per_stage_peak": "VmHWM reset per stage" if resettable else "running peak"}


def measure(spec: dict) -> dict:
    """`--config` in a child; its peak RSS from getrusage(RUSAGE_CHILDREN) (this wrapper waits for nothing else)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1)), "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
           "MLFLOW_TRACKING_URI": f"sqlite:///{spec['config']['work_root']}/mlflow.db"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.memory", "--config", json.dumps(spec)], cwd=ROOT,
                                stdout=out, stderr=err, text=True, env=env)
        killed = _watch(proc, float(spec.get("max_rss_mb", DEFAULT_MAX_RSS_MB)))
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - start
    peak_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)  # Linux: kilobytes
    if killed:
        done = {}
        for line in stderr.splitlines():
            if line.startswith("bench.memory done "):
                done.update(json.loads(line[len("bench.memory done "):]))
        peak_mb = max([peak_mb] + [v["peak_rss_mb"] for v in done.values()])
        return {"error": f"stopped at {peak_mb} MB RSS (limit {spec.get('max_rss_mb', DEFAULT_MAX_RSS_MB)} MB) "
                         f"during {_last_stage(stderr)}", "peak_rss_mb": peak_mb, "stages_done": done}
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {(stderr.strip().splitlines() or [''])[-1]}"}
    result = json.loads(lines[-1])
    # Resetting VmHWM resets the kernel's hiwater mark that ru_maxrss reports too: the child's ru_maxrss is then the
    # last stage's peak, and the pipeline's peak is the largest of it and every stage's own peak.
    peak_mb = max([peak_mb] + [v["peak_rss_mb"] for v in result["stages"].values()])
    return {"peak_rss_mb": peak_mb, "process_s": round(wall, 1), **result}


def _watch(proc, limit_mb: float) -> bool:
    """Wait for proc; kill it (True) if its RSS passes limit_mb, so a stage that holds the whole clip cannot take a
    shared machine down."""
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next((int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:")), 0.0)
        except OSError:
            rss = 0.0
        if rss > limit_mb:
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.1)
    return False


def _last_stage(stderr: str) -> str:
    marks = [l.split("bench.memory stage ", 1)[1].strip() for l in stderr.splitlines() if "bench.memory stage " in l]
    return marks[-1] if marks else "start-up"


def measure_in_wrapper(spec: dict) -> dict:
    """`--measure` in a fresh process, so its RUSAGE_CHILDREN holds this one configuration only."""
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--measure", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"wrapper exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"}
    return json.loads(lines[-1])


def run_config(tmp: str, width: int, height: int, frames: int, steps: int, skip_sampling: bool, stages=None,
               max_rss_mb: float = DEFAULT_MAX_RSS_MB) -> dict:
    """One clip through every stage in one child process -> its peak RSS, seconds per frame, per-stage figures."""
    name = f"{width}x{height}x{frames}"
    clip = make_clip(f"{tmp}/{name}.mp4", width, height, frames)
    config = {"input": clip, "task": "sr8", "mode": "benchmark", "steps": steps, "executor": "inline",
              "work_root": f"{tmp}/work-{name}", "out": f"{tmp}/out-{name}"}
    result = measure_in_wrapper({"config": config, "skip_sampling": skip_sampling, "threads": 1, "stages": stages,
                                 "max_rss_mb": max_rss_mb})
    if "error" in result:
        return {"frames": frames, "size": f"{width}x{height}", **result}
    stages = result["stages"]
    return {
        "frames": frames, "size": f"{width}x{height}",
        "peak_rss_mb": result["peak_rss_mb"],
        "streamed_peak_rss_mb": max((stages[s]["peak_rss_mb"] for s in STREAMED if s in stages), default=None),
        "streamed_rise_mb": {s: stages[s]["rise_mb"] for s in STREAMED if s in stages},
        "s_per_frame": round(sum(v["seconds"] for v in stages.values()) / frames, 3),
        "largest_stage": max(stages, key=lambda s: stages[s]["peak_rss_mb"]),
        "stages": stages, "per_stage_peak": result["per_stage_peak"],
        **({"sampling": "not measured in the size series (decode reads the noise as latents); tiled sampling: --tile"}
           if skip_sampling else {}),
    }


def run(frames=(32, 128, 512), sizes=((256, 256), (1280, 720), (1920, 1080)), steps: int = 2, stages=None,
        max_rss_mb: float = DEFAULT_MAX_RSS_MB) -> dict:
    kw = {"stages": stages, "max_rss_mb": max_rss_mb}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        by_frames = {str(n): run_config(tmp, 256, 256, n, steps, skip_sampling=False, **kw) for n in frames}
        by_size = {f"{w}x{h}": run_config(tmp, w, h, SIZE_SERIES_FRAMES, steps, skip_sampling=True, **kw) for w, h in sizes}
    out = {"steps": steps, "stages": list(stages or STAGES), "max_rss_mb": max_rss_mb,
           "sample_window": WINDOW,
           "size_series_frames": SIZE_SERIES_FRAMES, "by_frames": by_frames, "by_size": by_size}
    first, last = (by_frames[str(frames[0])], by_frames[str(frames[-1])]) if frames else ({}, {})  # --frames "": sizes only
    for label in ("peak_rss_mb", "streamed_peak_rss_mb"):
        if first.get(label) and last.get(label) and "error" not in first and "error" not in last:
            out[f"{label}_ratio_{frames[-1]}_vs_{frames[0]}"] = round(last[label] / first[label], 3)
    out["goal_ratio"] = GOAL_RATIO
    return out


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--frames", default="32,128,512")
    p.add_argument("--sizes", default="256x256,1280x720,1920x1080")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(STAGES) + " (in order)")
    p.add_argument("--max-rss-mb", type=float, default=DEFAULT_MAX_RSS_MB, help="stop a configuration above this RSS")
    p.add_argument("--config", default=None, help=argparse_hidden())
    p.add_argument("--measure", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.config:
        print(json.dumps(run_all_stages(json.loads(args.config))))
        return 0
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    frames = tuple(int(n) for n in args.frames.split(",") if n)
    sizes = tuple(tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s)
    stages = tuple(args.stages.split(",")) if args.stages else None
    emit(run(frames, sizes, args.steps, stages, args.max_rss_mb), args.json)
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
