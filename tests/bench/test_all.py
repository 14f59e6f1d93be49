"""bench.all: BENCHMARKS.md is rewritten section by section, so a partial rerun keeps the other sections."""

from __future__ import annotations

from bench import all as bench_all

DOC = """# Benchmarks

old header

## noise_warp

old noise figures 7.0 ms

## sampling

old sampling figures

## sampling throughput (bring-your-own checkpoint)

hand-written notes
"""


def test_partial_rerun_replaces_only_its_sections():
    machine = {"cpu_count": 2, "load_avg_1m": 3.5}
    out = bench_all.render({"noise_warp": {"nufft_ms_per_frame": 6.25, "speedup": 80}}, machine, "2026-11-29", DOC)
    assert "old noise figures" not in out and "| nufft_ms_per_frame | 6.25 |" in out
    assert "Measured 2026-11-29; machine: cpu_count `2`, load_avg_1m `3.5`" in out
    assert "old sampling figures" in out and "hand-written notes" in out  # other sections kept, in order
    assert out.index("## noise_warp") < out.index("## sampling\n") < out.index("## sampling throughput")
    assert out.count("## sampling") == 2  # `## sampling` did not match the throughput heading's prefix
    again = bench_all.render({"sampling": {"speedup": 2.5}, "memory": {"peak_mb": 900}}, machine, "2026-11-30", out)
    assert "old sampling figures" not in again and "hand-written notes" in again and "| nufft_ms_per_frame | 6.25 |" in again
    assert again.rstrip().endswith("`python -m bench.memory --json`")  # a new benchmark is appended
    fresh = bench_all.render({"models": {"skipped": "bench/models.py is not present"}}, machine, "2026-11-29")
    assert fresh.startswith(bench_all.HEADER) and "_skipped: bench/models.py is not present_" in fresh
