"""Stage sample: guided per-frame sampling of the whole video (wavefront-batched) on a model worker.

`SamplerWorker` holds one model; it runs in-process (`--executor inline`) or as a Ray actor (infra.ray_pool)
so the model is loaded once per actor and several videos can share it. Inputs and outputs are artifact
keys: tensors never travel through Prefect.
"""

from __future__ import annotations

import threading
import time

import torch
import xarray as xr

from ops import sampling
from tasks._stage import StageRecord, run_stage, stage_key, store_for
from tasks.models import get_model, model_identity


def sample_key(noise: str, encode: str, flow: str, model: str, steps: int, guidance: float, max_batch,
               guidance_space: str = "latent", text: dict | None = None, dtype: str = "float32") -> str:
    params = {"model": model_identity(model), "steps": steps, "guidance": guidance, "schedule": "wavefront"}
    if text:  # prompt, negative prompt, cfg scale (text-conditioned checkpoints)
        params["text"] = text
    if dtype != "float32":
        params["dtype"] = dtype
    if guidance > 0 and guidance_space != "latent":  # unguided samples are the same in either space
        params["guidance_space"] = guidance_space
    return stage_key("sample", params, {"generate_noise": noise, "encode": encode, "estimate_flow": flow})


class SamplerWorker:
    """Loads the model once; `sample` reads noise/conditioning/flows from the store and writes clean latents."""

    def __init__(self, model_name: str, threads: int | None = None, device: str | None = None, dtype: str = "float32"):
        from storage.models import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device or "auto")
        self.model_name = model_name
        self.model = get_model(model_name, self.device, dtype)
        self._progress = {"tick": 0, "total_ticks": 0}
        self._lock = threading.Lock()

    def progress(self) -> dict:
        with self._lock:
            return dict(self._progress)

    def _callback(self, info: dict) -> None:
        with self._lock:
            self._progress = {"tick": info["tick"] + 1, "total_ticks": info["total_ticks"], "frames_done": info["frames_done"]}
        external = getattr(self, "_external_callback", None)
        if external is not None:
            external(self._progress)

    def sample(self, work_root: str, storage_options: dict, key: str, noise: str, encode: str, flow: str, steps: int,
               guidance: float, max_batch=None, guidance_space: str = "latent", text: dict | None = None) -> dict:
        """guidance_space 'pixel': guidance compares decoded predictions warped by the pixel flow ('latent': the
        latent predictions warped by the latent flow, as the paper)."""
        if guidance_space not in ("pixel", "latent"):
            raise ValueError(f"guidance_space must be 'pixel' or 'latent' here (resolve 'auto' first), got {guidance_space!r}")
        store = store_for(work_root, storage_options)
        pixel = guidance_space == "pixel" and guidance > 0

        def compute() -> xr.Dataset:
            x = torch.from_numpy(store.open("generate_noise", noise)["noise"].values).to(self.device)  # (F, C, h, w)
            cond = torch.from_numpy(store.open("encode", encode)["cond_latents"].values).to(self.device)
            flows = store.open("estimate_flow", flow)
            prefix = "" if pixel else "latent_"
            fwd = torch.from_numpy(flows[prefix + "forward"].values).to(self.device)  # (F-1, H, W, 2) or (F-1, h, w, 2)
            valid = torch.from_numpy(flows[prefix + "valid"].values).to(self.device)
            decoding = dict(decode=self.model.decode, decoded_size=tuple(fwd.shape[1:3])) if pixel else {}
            sigmas = self.model.sigmas(steps)  # Karras, or the checkpoint scheduler's timesteps in VE form
            denoise = self.model.text_denoiser(**(text or {}))  # the encoded prompt (+ CFG) for SD layouts
            schedule = "wavefront" if guidance > 0 else "parallel"
            start = time.perf_counter()
            latents = sampling.sample_video(
                denoise, x, sigmas, cond, fwd, valid, guidance=guidance, schedule=schedule,
                max_batch=max_batch, callback=self._callback if schedule == "wavefront" else None, **decoding,
            )
            seconds = time.perf_counter() - start
            return xr.Dataset({"latents": (("frame", "c", "ly", "lx"), latents.float().cpu().numpy())},
                              attrs={"steps": steps, "guidance": guidance, "guidance_space": guidance_space if guidance > 0 else "none",
                                     "sampling_seconds": seconds, "device": self.device})

        record = run_stage(store, "sample", key, compute)
        return record.__dict__


class SamplerPool:
    """Ray actors that each hold the model once; videos are spread over them, one video's wavefront per actor.

    One GPU per actor when CUDA is present; otherwise explicit `num_cpus` and torch threads (Ray would
    otherwise pin actors to OMP_NUM_THREADS=1).
    """

    def __init__(self, model_name: str, size: int = 1, threads: int | None = None, work_root: str | None = None,
                 device: str = "auto", dtype: str = "float32"):
        import os

        import ray

        from infra.ray_pool import ensure_ray

        ensure_ray()
        # CUDA from the cluster's resources (a GPU worker node), not from what the driver process sees
        cuda = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
        threads = threads or max(1, (os.cpu_count() or 1) // size)
        options = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": threads}
        actor_cls = ray.remote(SamplerWorker).options(max_concurrency=2, **options)
        actor_device = "cuda" if cuda else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES: the actor's GPU is its cuda:0
        self.actors = [actor_cls.remote(model_name, None if cuda else threads, actor_device, dtype) for _ in range(size)]
        self._free = list(range(size))
        self._lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def _acquire(self) -> int:
        while True:
            with self._lock:
                if self._free:
                    return self._free.pop()
            time.sleep(0.05)

    def sample(self, request: dict, progress=None) -> dict:
        """Run one video's sampling on a free actor; `progress(dict)` is called about once a second."""
        import ray

        index = self._acquire()
        actor = self.actors[index]
        try:
            ref = actor.sample.remote(**request)
            while True:
                ready, _ = ray.wait([ref], timeout=1.0)
                if progress is not None:
                    progress(ray.get(actor.progress.remote()))
                if ready:
                    return ray.get(ref)
        finally:
            with self._lock:
                self._free.append(index)
