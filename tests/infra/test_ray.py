"""ModelActorPool on a local Ray: results equal an inline computation, torch threads as requested, lazy start,
progress polling, and a clear error (not a hang) when no node can host the actors."""
from __future__ import annotations

import os

import pytest
import torch

import time

from infra.ray_pool import ActorPlacementError, ModelActorPool, default_temp_dir, ensure_ray

pytestmark = pytest.mark.slow


class TinyModel:
    """Holds a seeded torch module; `run(seed)` returns (torch threads, module output)."""

    def __init__(self, width: int, seed: int = 0):
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.width = width

    def run(self, seed: int):
        x = torch.randn(4, self.width, generator=torch.Generator().manual_seed(seed))  # (4, width)
        with torch.no_grad():
            return torch.get_num_threads(), self.net(x)

    def add(self, a, b):
        return a + b


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    prev = os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2)
    assert ensure_ray() is None  # idempotent
    yield
    ray.shutdown()
    if prev is not None:
        os.environ["RAY_ADDRESS"] = prev


def test_default_temp_dir_is_short():
    assert len(default_temp_dir()) < 30 and default_temp_dir().startswith("/tmp/rv-ray-")


def test_pool_matches_inline_and_sets_threads(ray_local):
    reference = TinyModel(8, seed=3)
    seeds = list(range(6))
    expected = [reference.run(s)[1] for s in seeds]

    with ModelActorPool(TinyModel, args=(8,), kwargs={"seed": 3}, num_actors=2, num_cpus=1,
                        torch_threads=1) as pool:
        assert pool.actors == [] and pool.num_cpus is None  # lazy: nothing starts before the first call
        results = pool.map("run", seeds)
        assert pool.num_gpus == 0 and pool.num_cpus == 1 and len(pool.actors) == 2
        assert [t for t, _ in results] == [1] * len(seeds)
        for (_, got), want in zip(results, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert pool.map("add", [(1, 2), (3, 4)], star=True) == [3, 7]
        assert pool.call_all("add", 1, 1) == [2, 2]

    # one actor gets all CPUs by default, and as many torch threads
    with ModelActorPool(TinyModel, args=(8,), kwargs={"seed": 3}) as pool:
        [(threads, got)] = pool.map("run", [5])
        assert pool.num_cpus == 2  # the cluster's CPUs (ray_local: 2)
        assert threads == 2
        torch.testing.assert_close(got, expected[5], rtol=0, atol=0)


def test_actor_errors_propagate(ray_local):
    import ray

    with ModelActorPool(TinyModel, args=(8,), num_cpus=1) as pool:
        with pytest.raises(ray.exceptions.RayTaskError):
            pool.map("run", ["not a seed"])


class Counter:
    """Counts to `n` in steps, publishing its progress like SamplerWorker does (tick / total_ticks)."""

    def __init__(self):
        self.state = {"tick": 0, "total_ticks": 0}

    def progress(self) -> dict:
        return dict(self.state)

    def count(self, n: int, step_s: float) -> int:
        for i in range(n):
            time.sleep(step_s)
            self.state = {"tick": i + 1, "total_ticks": n}
        return n


def test_submit_polls_progress_and_shares_actors_between_threads(ray_local):
    from concurrent.futures import ThreadPoolExecutor

    seen = []
    with ModelActorPool(Counter, num_actors=1, num_cpus=1, progress_method="progress") as pool:
        assert pool.submit("count", 8, 0.1, progress=seen.append, poll_s=0.05) == 8
        ticks = [p["tick"] for p in seen]
        assert ticks == sorted(ticks) and len(set(ticks)) >= 3, seen  # several distinct, increasing updates
        assert all(p["total_ticks"] in (0, 8) for p in seen)
        with ThreadPoolExecutor(3) as ex:  # three callers, one actor: each waits for it, none fails
            assert list(ex.map(lambda n: pool.submit("count", n, 0.01), [3, 4, 5])) == [3, 4, 5]
    with ModelActorPool(Counter, num_cpus=1) as pool, pytest.raises(ValueError, match="progress_method"):
        pool.submit("count", 1, 0.0, progress=print)


def test_no_node_can_host_the_actor_is_a_clear_error_at_once(ray_local):
    t0 = time.monotonic()
    pool = ModelActorPool(TinyModel, args=(8,), num_cpus=1, ray_options={"resources": {"tpu_v9": 1}})
    with pytest.raises(ActorPlacementError, match=r"no Ray node can host a TinyModel actor: it needs .*tpu_v9=1"):
        pool.map("run", [0])
    assert time.monotonic() - t0 < 30 and pool.actors == []


def test_actors_that_cannot_start_in_time_are_a_clear_error(ray_local):
    with ModelActorPool(Counter, num_cpus=2) as hog:  # takes both CPUs of ray_local
        hog.start()
        t0 = time.monotonic()
        late = ModelActorPool(Counter, num_cpus=1, start_timeout=3)
        with pytest.raises(ActorPlacementError, match=r"1 of 1 Counter actors did not start within 3 s"):
            late.submit("count", 1, 0.0)
        assert time.monotonic() - t0 < 30
    with ModelActorPool(Counter, num_cpus=1, start_timeout=60) as pool:  # the CPUs are free again
        assert pool.submit("count", 2, 0.0) == 2


_THREAD_START = r"""
import sys, threading, time
sys.path.insert(0, {root!r})
import ray
from infra.ray_pool import ensure_ray

starter = threading.Thread(target=ensure_ray, kwargs={{"temp_dir": {temp!r}, "num_cpus": 1}})
starter.start(); starter.join(); time.sleep(2)  # the thread that started Ray is gone

@ray.remote(num_cpus=1)
def square(x):
    return x * x

print("result", ray.get(square.remote(7), timeout=60))
"""


def test_ray_started_from_a_thread_outlives_it(tmp_path):
    """restore-archive starts Ray from a pool thread; the local cluster must survive that thread's exit
    (Ray's daemons use PR_SET_PDEATHSIG, which fires on the spawning *thread's* exit)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    temp = f"/tmp/rv-ray-t{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = _THREAD_START.format(root=root, temp=temp)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "result 49" in done.stdout, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])


def test_sampler_on_ray_reports_progress_in_the_inline_schema(ray_local, tmp_path):
    """The sample stage on a pool actor (sampler_pool: what restore and restore-archive use) gives the flow's progress
    callback the same dicts as the inline worker's callback, and the same latents."""
    from tasks import sample as sample_stage
    from tests.tasks.test_sample_windows import MODEL, latents, request, write_inputs

    roots = {name: str(tmp_path / name) for name in ("inline", "ray")}
    for root in roots.values():
        write_inputs(root, frames=5)
    inline_seen = []
    worker = sample_stage.SamplerWorker(MODEL, device="cpu")
    worker._external_callback = inline_seen.append
    inline = worker.sample(**request(roots["inline"], steps=3))

    ray_seen = []
    pool = sample_stage.sampler_pool(MODEL, device="cpu")
    assert pool.actors == [] and pool.num_actors is None  # lazy: nothing started, nothing decided before the first call
    with pool:
        on_ray = pool.submit("sample", progress=ray_seen.append, poll_s=0.01, **request(roots["ray"], steps=3))
        assert (pool.num_actors, pool.num_gpus, pool.num_cpus) == (1, 0, 2)  # from the cluster (ray_local: 2 CPUs, no GPU)
    assert on_ray["key"] == inline["key"] and not on_ray["cached"]
    a, b = latents(roots["ray"], on_ray["key"]), latents(roots["inline"], inline["key"])
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()  # the actor runs 2 torch threads, this test 1: float sums differ
    assert ray_seen and {frozenset(d) for d in ray_seen} == {frozenset(d) for d in inline_seen} == {
        frozenset({"tick", "total_ticks", "frames_done"})}
    assert ray_seen[-1] == inline_seen[-1] == {"tick": 7, "total_ticks": 7, "frames_done": 5}  # 5 frames + 3 steps - 1
    ticks = [d["tick"] for d in ray_seen]
    assert ticks == sorted(ticks)


def test_a_sampler_pool_starts_no_ray_until_used():
    """restore-archive builds its pool before the first video: a batch of unreadable videos must not start Ray."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ("import sys; sys.path.insert(0, %r)\nimport ray\nfrom tasks.sample import sampler_pool\n"
              "pool = sampler_pool('sr8-gp')\nprint('initialized', ray.is_initialized(), pool.num_actors)" % root)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "initialized False None" in done.stdout, done.stderr[-2000:]
