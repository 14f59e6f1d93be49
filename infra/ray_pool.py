"""Ray: connect or start a local cluster, and a pool of actors that each hold a model once.

Generic: the pool knows nothing about what the actors compute.

    ensure_ray()
    with ModelActorPool(Sampler, args=(model_dir,), num_actors=2) as pool:
        outs = pool.map("sample", jobs)  # in the order of `jobs`
"""
from __future__ import annotations

import getpass
import hashlib
import os
import threading
from typing import Any, Iterable, Sequence

__all__ = ["ensure_ray", "default_temp_dir", "ModelActorPool"]


def default_temp_dir() -> str:
    """A short per-user, per-checkout Ray temp dir: Ray's Unix socket paths must stay < 107 chars."""
    key = f"{getpass.getuser()}:{os.path.abspath(os.getcwd())}"
    return f"/tmp/rv-ray-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def ensure_ray(temp_dir: str | None = None, address: str | None = None, num_cpus: int | None = None):
    """Initialise Ray once per process; returns the context (or None when already initialised).

    `address` or RAY_ADDRESS: connect to that cluster. Otherwise start a local one with auth off
    (RAY_AUTH_MODE=disabled, so nothing is written to ~/.ray), no dashboard, no usage stats,
    `num_cpus` (default: all cores) and a short temp dir.
    """
    import ray

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        return ray.init(address=address, ignore_reinit_error=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # read by the driver and inherited by raylet/GCS
    temp_dir = temp_dir or default_temp_dir()
    if len(temp_dir) > 60:
        raise ValueError(f"Ray temp dir {temp_dir!r} is too long for Unix socket paths (keep it under ~60 chars)")
    os.makedirs(temp_dir, exist_ok=True)
    start = lambda: ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                             ignore_reinit_error=True, _temp_dir=temp_dir)
    if threading.current_thread() is threading.main_thread():
        return start()
    return _start_in_keeper_thread(start)


_KEEPER_LOCK = threading.Lock()


def _start_in_keeper_thread(start):
    """Run `start()` (ray.init) in a daemon thread that never exits, and wait for it.

    Ray starts gcs_server and raylet with PR_SET_PDEATHSIG, which Linux fires when the *thread* that
    spawned them exits, not the process. Started from a pool thread (restore-archive's workers, Prefect
    task threads), the local cluster would be SIGKILLed as soon as that thread finished.
    """
    import ray

    with _KEEPER_LOCK:
        if ray.is_initialized():
            return None
        done, result = threading.Event(), {}

        def keeper():
            try:
                result["context"] = start()
            except BaseException as exc:  # re-raised in the caller
                result["error"] = exc
            done.set()
            threading.Event().wait()  # live as long as the process: Ray's daemons die with this thread

        threading.Thread(target=keeper, name="ray-keeper", daemon=True).start()
        done.wait()
        if "error" in result:
            raise result["error"]
        return result["context"]


class _Host:
    """Ray actor that sets torch threads, then builds and holds one user object."""

    def __init__(self, actor_cls, args, kwargs, threads: int):
        os.environ["OMP_NUM_THREADS"] = str(threads)  # Ray sets 1 in actors; torch reads its own setting below
        os.environ["MKL_NUM_THREADS"] = str(threads)
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            pass
        self.obj = actor_cls(*args, **(kwargs or {}))

    def call(self, method: str, *args, **kwargs):
        return getattr(self.obj, method)(*args, **kwargs)

    def call_star(self, method: str, args):
        return getattr(self.obj, method)(*args)


class ModelActorPool:
    """N Ray actors, each holding `actor_cls(*args, **kwargs)`; `.map` spreads method calls over them.

    Resources per actor: `num_gpus=1` when the cluster has GPUs (override with `num_gpus`), and
    explicit `num_cpus` (default: all CPUs for one actor, 1 each for several); torch threads in the
    actor = `torch_threads` or the actor's CPU count (Ray would otherwise leave OMP_NUM_THREADS=1).
    """

    def __init__(self, actor_cls: type, args: Sequence = (), kwargs: dict | None = None, num_actors: int = 1,
                 num_cpus: float | None = None, num_gpus: float | None = None, torch_threads: int | None = None,
                 ray_options: dict | None = None):
        import ray

        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        ensure_ray()
        resources = ray.cluster_resources()
        if num_gpus is None:
            num_gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        if num_cpus is None:
            total = int(resources.get("CPU", os.cpu_count() or 1))
            num_cpus = max(1, total) if num_actors == 1 and not num_gpus else 1
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.torch_threads = int(torch_threads or max(1, int(num_cpus)))
        opts = {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {}), **(ray_options or {})}
        host = ray.remote(_Host).options(**opts)
        self.actors = [host.remote(actor_cls, tuple(args), kwargs, self.torch_threads) for _ in range(num_actors)]

    def map(self, method: str, items: Iterable[Any], star: bool = False) -> list:
        """`[actor.method(item) for item in items]` spread over the actors; results in input order.

        `star=True` unpacks each item as positional arguments.
        """
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        if star:
            return list(pool.map(lambda a, it: a.call_star.remote(method, tuple(it)), items))
        return list(pool.map(lambda a, it: a.call.remote(method, it), items))

    def call_all(self, method: str, *args, **kwargs) -> list:
        """Call `method(*args, **kwargs)` on every actor; one result per actor."""
        import ray

        return ray.get([a.call.remote(method, *args, **kwargs) for a in self.actors])

    def shutdown(self) -> None:
        """Kill the actors (Ray itself stays up for the next pool)."""
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []

    def __enter__(self) -> "ModelActorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
