"""Ray: connect or start a local cluster, and a pool of actors that each hold a model once.

Generic: the pool knows nothing about what the actors compute.

    with ModelActorPool(Sampler, args=(model_dir,), num_actors=2, progress_method="progress") as pool:
        outs = pool.map("sample", jobs)                 # in the order of `jobs`
        out = pool.submit("sample", job, progress=cb)   # one call on a free actor, progress dicts to cb

RAY_ADDRESS (or `ensure_ray(address=...)`) connects to an existing cluster instead of starting a local one.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import threading
from typing import Any, Callable, Iterable, Sequence

__all__ = ["ensure_ray", "default_temp_dir", "ModelActorPool", "ActorPlacementError"]


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


class ActorPlacementError(RuntimeError):
    """No node of the Ray cluster can (or did, within the timeout) start the pool's actors."""


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

    def ready(self) -> bool:
        return True

    def call(self, method: str, *args, **kwargs):
        return getattr(self.obj, method)(*args, **kwargs)

    def call_star(self, method: str, args):
        return getattr(self.obj, method)(*args)


def _fits(node: dict, need: dict) -> bool:
    return all(node.get(name, 0.0) >= amount for name, amount in need.items() if amount)


class ModelActorPool:
    """N Ray actors, each holding `actor_cls(*args, **kwargs)` once; calls are spread over them.

    - Lazy: Ray and the actors start on the first call (`start()` to start them now), so work that never
      reaches the pool never pays for it.
    - Resources come from the cluster (`ray.cluster_resources()`), not from the driver's hardware: one GPU per
      actor when the cluster has GPUs (override `num_gpus`); `num_actors=None`: one actor per GPU of the cluster
      (1 on a CPU cluster), decided at start; `num_cpus` default = 1 per GPU actor, else the cluster's CPUs shared
      among the actors; torch threads in the actor = `torch_threads` or its CPU count (Ray
      would otherwise leave OMP_NUM_THREADS=1).
    - A clear `ActorPlacementError` at once when no alive node has the resources one actor asks for, and after
      `start_timeout` s when the actors did not come up (cluster busy, autoscaler gave none) - never a silent hang.
    - `progress_method`: the name of a method of the actor object returning a progress dict; actors then run two
      calls at once so `submit(..., progress=cb)` can poll it about every `poll_s` and hand each dict to `cb`
      (the same schema the object passes to its callback when run inline).
    """

    def __init__(self, actor_cls: type, args: Sequence = (), kwargs: dict | None = None, num_actors: int | None = 1,
                 num_cpus: float | None = None, num_gpus: float | None = None, torch_threads: int | None = None,
                 ray_options: dict | None = None, progress_method: str | None = None, start_timeout: float = 300.0,
                 lazy: bool = True):
        if num_actors is not None and num_actors < 1:
            raise ValueError(f"num_actors must be >= 1 (or None: one per GPU of the cluster), got {num_actors}")
        if start_timeout <= 0:
            raise ValueError(f"start_timeout must be > 0 seconds, got {start_timeout}")
        self.actor_cls, self.args, self.kwargs = actor_cls, tuple(args), kwargs
        self._want_actors, self.num_actors, self.ray_options = num_actors, num_actors, dict(ray_options or {})
        self.progress_method, self.start_timeout = progress_method, start_timeout
        self._want = (num_cpus, num_gpus, torch_threads)
        self.num_cpus = self.num_gpus = self.torch_threads = None
        self.actors: list = []
        self._free: list[int] = []
        self._cond = threading.Condition()
        self._start_lock = threading.Lock()
        if not lazy:
            self.start()

    def resources(self) -> dict:
        """{"num_actors", and per actor "num_cpus", "num_gpus", "torch_threads"}, decided from the cluster (Ray is
        started if needed)."""
        import ray

        ensure_ray()
        total = ray.cluster_resources()
        num_cpus, num_gpus, threads = self._want
        if num_gpus is None:
            num_gpus = 1 if total.get("GPU", 0) >= 1 else 0
        num_actors = self._want_actors or (max(1, int(total.get("GPU", 0) // num_gpus)) if num_gpus else 1)
        if num_cpus is None:
            num_cpus = 1 if num_gpus else max(1, int(total.get("CPU", 1)) // num_actors)
        return {"num_actors": num_actors, "num_cpus": num_cpus, "num_gpus": num_gpus,
                "torch_threads": int(threads or max(1, int(num_cpus)))}

    def _check_placeable(self, need: dict) -> None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(_fits(node, need) for node in nodes):
            have = "; ".join(", ".join(f"{k}={v:g}" for k, v in sorted(n.items()) if k in ("CPU", "GPU") or k in need)
                             for n in nodes) or "no alive node"
            raise ActorPlacementError(
                f"no Ray node can host a {self.actor_cls.__name__} actor: it needs "
                f"{', '.join(f'{k}={v:g}' for k, v in need.items() if v)}, the nodes have [{have}]. "
                "Ask for less (num_gpus=0 / fewer CPUs, e.g. --executor inline on a CPU machine) or add a node with "
                "these resources to the cluster (RAY_ADDRESS)")

    def start(self) -> "ModelActorPool":
        """Start Ray (if needed) and the actors; wait until every actor is built. Idempotent, thread-safe."""
        import ray

        with self._start_lock:
            if self.actors:
                return self
            res = self.resources()
            self.num_actors, self.num_cpus, self.num_gpus = res["num_actors"], res["num_cpus"], res["num_gpus"]
            self.torch_threads = res["torch_threads"]
            opts = {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {}),
                    **({"max_concurrency": 2} if self.progress_method else {}), **self.ray_options}
            need = {"CPU": float(opts.get("num_cpus") or 0), "GPU": float(opts.get("num_gpus") or 0),
                    **{k: float(v) for k, v in (opts.get("resources") or {}).items()}}
            self._check_placeable(need)
            host = ray.remote(_Host).options(**opts)
            actors = [host.remote(self.actor_cls, self.args, self.kwargs, self.torch_threads)
                      for _ in range(self.num_actors)]
            ready, pending = ray.wait([a.ready.remote() for a in actors], num_returns=len(actors),
                                      timeout=self.start_timeout)
            if pending:
                for a in actors:
                    ray.kill(a)
                raise ActorPlacementError(
                    f"{len(pending)} of {len(actors)} {self.actor_cls.__name__} actors did not start within "
                    f"{self.start_timeout:g} s (each needs {need}; cluster now has {ray.available_resources()} free "
                    f"of {ray.cluster_resources()}): the cluster is busy or its nodes cannot load the model; raise "
                    "start_timeout or free the resources")
            try:
                ray.get(ready)  # an actor whose constructor raised: its error, here
            except Exception:
                for a in actors:
                    ray.kill(a)
                raise
            with self._cond:
                self.actors = actors
                self._free = list(range(len(actors)))
        return self

    def map(self, method: str, items: Iterable[Any], star: bool = False) -> list:
        """`[actor.method(item) for item in items]` spread over the actors; results in input order.

        `star=True` unpacks each item as positional arguments.
        """
        from ray.util import ActorPool

        self.start()
        pool = ActorPool(self.actors)
        if star:
            return list(pool.map(lambda a, it: a.call_star.remote(method, tuple(it)), items))
        return list(pool.map(lambda a, it: a.call.remote(method, it), items))

    def submit(self, method: str, *args, progress: Callable[[dict], None] | None = None, poll_s: float = 1.0,
               **kwargs) -> Any:
        """`method(*args, **kwargs)` on the next free actor (blocks until one is free; thread-safe), its result.

        With `progress` (needs `progress_method`), the actor's progress dict is passed to it about every `poll_s`.
        An actor that dies raises at once (ray.exceptions.RayActorError), not after a poll loop.
        """
        import ray

        if progress is not None and not self.progress_method:
            raise ValueError("submit(progress=...) needs the pool built with progress_method='<method name>'")
        self.start()
        with self._cond:
            while not self._free:
                self._cond.wait()
            index = self._free.pop()
        actor = self.actors[index]
        try:
            ref = actor.call.remote(method, *args, **kwargs)
            while True:
                ready, _ = ray.wait([ref], timeout=poll_s)
                if progress is not None:
                    try:
                        progress(ray.get(actor.call.remote(self.progress_method), timeout=max(poll_s, 10.0)))
                    except ray.exceptions.GetTimeoutError:
                        pass
                if ready:
                    return ray.get(ref)
        finally:
            with self._cond:
                self._free.append(index)
                self._cond.notify()

    def call_all(self, method: str, *args, **kwargs) -> list:
        """Call `method(*args, **kwargs)` on every actor; one result per actor."""
        import ray

        self.start()
        return ray.get([a.call.remote(method, *args, **kwargs) for a in self.actors])

    def shutdown(self) -> None:
        """Kill the actors (Ray itself stays up for the next pool; it stops when this process exits)."""
        import ray

        with self._cond:
            actors, self.actors, self._free = self.actors, [], []
        for a in actors:
            try:
                ray.kill(a)
            except Exception:
                pass

    def __enter__(self) -> "ModelActorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
