"""Stage sample: guided per-frame sampling (wavefront-batched) on a model worker, window by window.

`SamplerWorker` holds one model; it runs in-process (`--executor inline`) or as a Ray actor (infra.ray_pool)
so the model is loaded once per actor and several videos can share it. Inputs and outputs are artifact
keys: tensors never travel through Prefect.

Temporal windows (`window` frames at a time, None = the whole video): only one window's noise, conditioning
and flows are read from zarr and held. Each finished window is committed as its own artifact
(`sample_window/{key}-{start}-{stop}.zarr`: its clean latents and the carry, its last frame's prediction at
every step), so a killed run resumes at the first uncommitted window, and the next window's first frame is
guided by the carry exactly as inside one long wavefront. The final `sample` artifact is assembled from the
window artifacts (frame-chunked, never whole in memory), after which they are removed.

What is in the sample key: `window` is not (windows change memory, not numbers: windowed == unwindowed to float
precision, tested, so a cached result is valid for any window); `tile` is (blending tile predictions changes
the numbers slightly, so a tiled and an untiled result are different artifacts).
"""

from __future__ import annotations

import threading
import time

import torch
import xarray as xr

from ops import sampling
from tasks._stage import Stage, StageRecord, run_stage, store_for
from tasks.models import get_model, model_identity

WINDOW_STAGE = "sample_window"  # committed windows of unfinished sample artifacts


def _identity(a: dict, _options=None) -> dict:
    """What makes the clean latents what they are: `tile` (latent cells, None = untiled) changes the numbers, a window,
    the batch bound, the device and the executor don't. solver: a zero-shot solver's parameters
    (flows.config.RestoreConfig.solver_params), whose measurement comes from the `prepare` artifact instead of encode."""
    guidance = a["guidance"]
    params = {"model": model_identity(a["model"]), "steps": a["steps"], "guidance": guidance, "schedule": "wavefront"}
    if a.get("text"):  # prompt, negative prompt, cfg scale (text-conditioned checkpoints)
        params["text"] = a["text"]
    if a.get("dtype", "float32") != "float32":
        params["dtype"] = a["dtype"]
    if guidance > 0 and a.get("guidance_space", "latent") != "latent":  # unguided samples are the same in either space
        params["guidance_space"] = a["guidance_space"]
    if a.get("tile") is not None:
        params["tile"] = a["tile"]
    if a.get("solver"):
        params["solver"] = dict(a["solver"])
    return params


def _inputs(a: dict) -> tuple:
    """Conditional sampling reads the encode stage's conditioning; a zero-shot solver its measurement (prepare)."""
    return ("generate_noise", "prepare", "estimate_flow") if a.get("solver") else ("generate_noise", "encode", "estimate_flow")


def window_key(key: str, span: tuple[int, int]) -> str:
    """Key of one committed window [start, stop) of the sample artifact `key`."""
    return f"{key}-{span[0]}-{span[1]}"


def _rows(da: xr.DataArray, rows: slice) -> torch.Tensor:
    """Read only `rows` of a lazily opened per-frame (or per-frame-pair) array."""
    return torch.from_numpy(da.isel({da.dims[0]: rows}).values)


class SamplerWorker:
    """Loads the model once; `sample` reads noise/conditioning/flows from the store and writes clean latents."""

    def __init__(self, model_name: str, threads: int | None = None, device: str | None = None, dtype: str = "float32"):
        from storage.models import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device or "auto")
        self.model_name = model_name
        self.model = get_model(model_name, self.device, dtype)
        self._progress = {"tick": 0, "total_ticks": 0, "frames_done": 0}  # the schema of every report, polled or called back
        self._lock = threading.Lock()

    def progress(self) -> dict:
        with self._lock:
            return dict(self._progress)

    def _report(self, tick: int, total_ticks: int, frames_done: int) -> None:
        """Progress over the whole video: `tick` ticks of `total_ticks` done, counted across windows."""
        with self._lock:
            self._progress = {"tick": tick, "total_ticks": total_ticks, "frames_done": frames_done}
        external = getattr(self, "_external_callback", None)
        if external is not None:
            external(dict(self._progress))

    def sample(self, work_root: str, storage_options: dict, key: str, noise: str, encode: str, flow: str, steps: int,
               guidance: float, max_batch=None, guidance_space: str = "latent", window: int | None = None,
               tile: int | None = None, text: dict | None = None, solver: dict | None = None,
               zero_shot: dict | None = None) -> dict:
        """solver (RestoreConfig.solver_params) and zero_shot (prepare key, task, seed): run `solve` instead; then
        window, tile, guidance_space and max_batch are not used.

        guidance_space 'pixel': guidance compares decoded predictions warped by the pixel flow ('latent': the
        latent predictions warped by the latent flow, as the paper). window: frames sampled at a time (None: all);
        tile: latent tile side for MultiDiffusion tiles (None: whole frames); `key` must be `STAGE.key(...)` with
        the same tile. Returns the StageRecord fields; extra = {"windows": n, "windows_computed": [indices]}."""
        if guidance_space not in ("pixel", "latent"):
            raise ValueError(f"guidance_space must be 'pixel' or 'latent' here (resolve 'auto' first), got {guidance_space!r}")
        if solver:
            return self.solve(work_root, storage_options, key, noise, flow, steps, guidance, solver, **(zero_shot or {}))
        store = store_for(work_root, storage_options)
        pixel = guidance_space == "pixel" and guidance > 0
        schedule = "wavefront" if guidance > 0 else "parallel"
        denoise = self.model.text_denoiser(**(text or {}))  # the encoded prompt (+ CFG) for SD layouts
        denoiser = denoise if tile is None else sampling.tiled_denoiser(denoise, tile)
        sigmas = self.model.sigmas(steps)  # Karras, or the checkpoint scheduler's timesteps in VE form
        computed: list[int] = []
        spans: list[tuple[int, int]] = []

        def window_ticks(span):
            return (span[1] - span[0]) + steps - 1 if schedule == "wavefront" else steps

        def compute() -> xr.Dataset:
            noise_da = store.open("generate_noise", noise)["noise"]  # lazy (F, C, h, w)
            cond_da = store.open("encode", encode)["cond_latents"]
            flows = store.open("estimate_flow", flow)
            prefix = "" if pixel else "latent_"
            spans.extend(sampling.window_spans(noise_da.shape[0], window))
            total = sum(window_ticks(s) for s in spans)
            done, carry, seconds = 0, None, 0.0
            for i, span in enumerate(spans):
                wkey = window_key(key, span)
                if store.exists(WINDOW_STAGE, wkey):  # committed by an earlier, interrupted run
                    carry = None
                    done += window_ticks(span)
                    self._report(done, total, span[1])
                    continue
                if carry is None and i > 0 and schedule == "wavefront":
                    carry = torch.from_numpy(store.open(WINDOW_STAGE, window_key(key, spans[i - 1]))["carry"].values)
                frames, rows = slice(*span), sampling.window_flow_rows(span)
                x = _rows(noise_da, frames).to(self.device)  # (W, C, h, w)
                cond = _rows(cond_da, frames).to(self.device)
                fwd = valid = None  # unguided frames are independent: no flows to read
                if schedule == "wavefront":
                    fwd = _rows(flows[prefix + "forward"], rows).to(self.device)  # (W or W-1, H, W, 2) or latent grid
                    valid = _rows(flows[prefix + "valid"], rows).to(self.device)
                decoding = dict(decode=self.model.decode, decoded_size=tuple(flows[prefix + "forward"].shape[1:3])) if pixel else {}
                offset = done

                def callback(info, span=span, offset=offset):
                    if "tick" in info:  # wavefront
                        self._report(offset + info["tick"] + 1, total, span[0] + info["frames_done"])
                    else:  # parallel: every frame of the window advances one step
                        last = info["step"] + 1 == info["total"]
                        self._report(offset + info["step"] + 1, total, span[1] if last else span[0])

                start = time.perf_counter()
                latents, carry = sampling.sample_window(
                    denoiser, x, sigmas, cond, fwd, valid, guidance=guidance, schedule=schedule, max_batch=max_batch,
                    callback=callback, previous=carry, start=self.model.start(cond), **decoding,
                )
                seconds += time.perf_counter() - start
                data = {"latents": (("frame", "c", "ly", "lx"), latents.float().cpu().numpy())}
                if carry is not None:  # kept as stored, so a resumed run continues from the very same numbers
                    carry = carry.float().to(latents.dtype)
                    data["carry"] = (("step", "cc", "cy", "cx"), carry.float().cpu().numpy())
                store.write(WINDOW_STAGE, wkey, xr.Dataset(data, attrs={"start": span[0], "stop": span[1]}))
                computed.append(i)
                done += window_ticks(span)
            parts = [store.open(WINDOW_STAGE, window_key(key, s))["latents"] for s in spans]  # lazy, frame chunks
            latents = xr.concat(parts, dim="frame") if len(parts) > 1 else parts[0]
            return xr.Dataset({"latents": latents},
                              attrs={"steps": steps, "guidance": guidance, "guidance_space": guidance_space if guidance > 0 else "none",
                                     "sampling_seconds": seconds, "device": self.device, "window": window or 0,
                                     "tile": tile or 0})

        record = run_stage(store, "sample", key, compute)
        for span in spans:  # the published artifact holds every frame; the windows are no longer needed
            store.remove(WINDOW_STAGE, window_key(key, span))
        record.extra = {"windows": len(spans), "windows_computed": computed}
        return record.__dict__


    def solve(self, work_root: str, storage_options: dict, key: str, noise: str, flow: str, steps: int, guidance: float,
              solver: dict, prepare: str, task: str, seed: int) -> dict:
        """Zero-shot restoration of the whole video with the unconditional prior: ops.solvers.solve(solver["solver"])
        on y and A of tasks.degrade.measurement, A applied to the decoded latents (A(decode(x))). solver["init"] > 0
        starts D-Flow from the inverted back-projection (the prepare stage's cond) blended with the stored noise
        (ops.solvers.dflow_start). source "video" (dflow / dmplug) optimises all frames jointly
        (ops.solvers.video_objective): the same start, written as the noise stage's own GP draw (the same seed, so
        source(w0) is the stored gp noise) at the flow's chained latent positions, its weights fixed at the MAP fit
        of the same inversion, plus optimised per-frame residuals (ops.solvers.ResidualSource); the objective adds the
        pixel-space temporal coupling along the estimated flow, the residual penalty and the chi regulariser.
        guidance > 0: self-guidance in latent space.
        Per-iteration / per-step losses go into the artifact as `history_<name>` arrays."""
        import numpy as np

        from ops import gp, solvers
        from tasks.degrade import measurement

        store = store_for(work_root, storage_options)
        params = dict(solver)
        name = params.pop("solver")
        source_kind = params.pop("source", "frame")
        params.pop("seed", None)

        def compute() -> xr.Dataset:
            x = torch.from_numpy(store.open("generate_noise", noise)["noise"].values).float().to(self.device)  # (F, C, h, w)
            flows = store.open("estimate_flow", flow)
            y, pixel_operator = measurement(task, store.open("prepare", prepare), slice(None), self.device)  # (F, ...)
            decode = getattr(self.model, "_decode_linear", self.model.decode)  # unclamped where linear: gradients flow

            def operator(latents, rows):
                return pixel_operator(decode(latents), rows)

            def denoiser(x_in, sigma, cond=None):
                return self.model.denoise(x_in, sigma)

            sigmas = sampling.karras_sigmas(steps, float(self.model.sigma_min), float(self.model.sigma_max)).to(x)
            extra = {}
            if guidance > 0:
                extra = dict(guidance=guidance, forward=torch.from_numpy(flows["latent_forward"].values).to(x),
                             valid=torch.from_numpy(flows["latent_valid"].values).to(self.device))
            start = x
            if name in ("dflow", "dmplug"):
                field = weights = None
                if source_kind == "video":  # the shared GP field: the noise stage's own draw at the chained positions
                    positions = torch.from_numpy(flows["latent_positions"].values)  # (F, h, w, 2)
                    features = gp.draw_rff(np.random.default_rng(seed), x.shape[1], max(x.shape[-2:]))  # the noise stage's draw
                    field, weights = solvers.video_source(features, positions, device=x.device)
                    weights = weights.to(x)  # (C, J)
                alpha = params.pop("init", 0.0)  # D-Flow's start: the inverted back-projection (cond) blended in
                if alpha:
                    back = _rows(store.open("prepare", prepare)["cond"], slice(None)).permute(0, 3, 1, 2).float() / 255.0
                    with torch.no_grad():
                        latents0 = self.model.encode(back.to(self.device))  # (F, C, h, w)
                    start = solvers.dflow_start(denoiser, latents0, sigmas, start, alpha)
                    if field is not None:  # the field starts from the MAP weights of the same inversion
                        weights = solvers.dflow_start(denoiser, latents0, sigmas, weights, alpha, field)
                if field is not None:  # per-frame start kept; the residual is what the field leaves of it
                    source = solvers.ResidualSource(field, weights)
                    start = source.start(start)  # delta (F, C, h, w)
                    extra["source"] = source
                    extra["penalty"] = solvers.video_objective(
                        params.pop("coupling"), torch.from_numpy(flows["forward"].values).to(x),
                        torch.from_numpy(flows["valid"].values).to(self.device), decode, source, params.pop("residual"),
                        "chi", params.pop("source_reg"))
            if name == "vipaint":
                extra["generator"] = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            with torch.enable_grad():
                latents, history = solvers.solve(name, denoiser, start, sigmas, y, operator, **params, **extra)
            seconds = time.perf_counter() - t0
            data = {"latents": (("frame", "c", "ly", "lx"), latents.detach().float().cpu().numpy())}
            attrs = {"steps": steps, "guidance": guidance, "guidance_space": "latent" if guidance > 0 else "none",
                     "sampling_seconds": seconds, "device": self.device, "window": 0, "tile": 0, "solver": name,
                     "source": source_kind}
            for k, v in history.items():
                if isinstance(v, list) and v and all(isinstance(e, (int, float)) for e in v):
                    data[f"history_{k}"] = ((f"history_{k}_index",), np.asarray(v, dtype=np.float64))
                elif isinstance(v, (int, float)):
                    attrs[f"history_{k}"] = v
            return xr.Dataset(data, attrs=attrs)

        record = run_stage(store, "sample", key, compute)
        record.extra = {"windows": 1, "windows_computed": [0]}
        return record.__dict__


def sampler_pool(model_name: str, num_actors: int | None = None, device: str = "auto", dtype: str = "float32"):
    """Ray actors that each hold the model once (infra.ray_pool.ModelActorPool: lazy, resources from the cluster, a
    clear error when no node can host one); one video's windows run on one actor, videos spread over them.

    device 'auto': a GPU per actor when the cluster has GPUs (num_actors None: one actor per GPU, decided when the
    pool starts, so nothing starts Ray before the first video reaches sampling), else CPU actors; 'cpu' / 'cuda[:N]'
    force it. Inside an actor Ray sets CUDA_VISIBLE_DEVICES, so its GPU is always its `cuda`.
    """
    from infra.ray_pool import ModelActorPool

    num_gpus = None if device == "auto" else int(device.startswith("cuda"))
    actor_device = "cuda" if device.startswith("cuda") else device
    return ModelActorPool(SamplerWorker, args=(model_name, None, actor_device, dtype), num_actors=num_actors,
                          num_gpus=num_gpus, progress_method="progress")


class _Progress:
    """Sampling progress to a tqdm bar and a Prefect progress artifact (of the sample task run)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="sampling", unit="tick")
        self.artifact = None
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return  # outside a flow or task run there is nowhere to publish it (and no server should start for it)
        try:
            from prefect.artifacts import create_progress_artifact

            self.artifact = create_progress_artifact(progress=0.0, description="restore-video sampling")
        except Exception:  # the API is unreachable: the bar still shows progress
            self.artifact = None

    def __call__(self, info: dict) -> None:
        done, total = info.get("tick", 0), max(info.get("total_ticks", 0), 1)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        if self.artifact is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact, progress=100.0 * done / total)

    def close(self) -> None:
        self.bar.close()


def worker_request(store, call) -> dict:
    """The SamplerWorker.sample keyword arguments of a sample call (artifact keys and numbers: no tensors)."""
    a, up = call.args, call.upstream
    request = dict(work_root=store.root_url, storage_options=store.storage_options, key=call.key, noise=up["generate_noise"],
                   encode=up.get("encode"), flow=up["estimate_flow"], steps=a["steps"], guidance=a["guidance"],
                   max_batch=a.get("max_batch"), guidance_space=a["guidance_space"], text=a.get("text"))
    if a.get("solver"):
        request.update(solver=a["solver"], zero_shot=dict(prepare=up["prepare"], task=a["task"], seed=a["seed"]))
    for name in ("window", "tile"):  # only when the job needs them (None = all frames / whole frames: the default)
        if a.get(name) is not None:
            request[name] = a[name]
    return request


def _delegate(store, call, pool=None) -> StageRecord:
    """Sample on the given actor pool, on a fresh Ray actor (`executor` 'ray'), or in-process ('inline'); the worker
    publishes the artifact (window by window) itself."""
    a = call.args
    request = worker_request(store, call)
    progress = _Progress(total=a["steps"])
    try:
        if pool is not None:
            return StageRecord(**pool.submit("sample", progress=progress, **request))
        if a.get("executor", "inline") == "inline":
            worker = SamplerWorker(a["model"], device=a.get("device", "auto"), dtype=a.get("dtype", "float32"))
            worker._external_callback = progress
            return StageRecord(**worker.sample(**request))
        with sampler_pool(a["model"], num_actors=1, device=a.get("device", "auto"), dtype=a.get("dtype", "float32")) as ray_pool:
            return StageRecord(**ray_pool.submit("sample", progress=progress, **request))
    finally:
        progress.close()


# args: model, steps, guidance, guidance_space (resolved: pixel | latent), text, dtype, tile (in the key); max_batch,
# window, device, executor (not); zero-shot: solver (in the key), task, seed
STAGE = Stage("sample", version="1", inputs=_inputs, identity=_identity, delegate=_delegate)
