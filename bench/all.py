"""Every benchmark, each in its own process (`python -m bench.<name> --json`), then BENCHMARKS.md rewritten
with the figures, the machine and the date.

python -m bench.all [--only noise_warp,sampling] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("noise_warp", "sampling", "models", "end_to_end", "solvers", "memory")


def run_one(name: str, timeout: float = 3600) -> dict:
    """`python -m bench.<name> --json` -> its JSON object (the last line of stdout), plus wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}",
                "wall_s": wall}
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{") and l.rstrip().endswith("}")]
    try:
        result = json.loads(lines[-1]) if lines else {"error": "no one-line JSON object in the output"}
    except json.JSONDecodeError as exc:
        result = {"error": f"unparsable JSON output: {exc}"}
    result["wall_s"] = wall
    return result


def describe(name: str) -> str:
    """First paragraph of the benchmark module's docstring."""
    spec = importlib.util.find_spec(f"bench.{name}")
    if spec is None:
        return ""
    text = Path(spec.origin).read_text()
    doc = text.split('"""')[1] if text.lstrip().startswith('"""') else ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _value(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"`{v}`" if isinstance(v, (list, tuple)) else str(v)


def render(results: dict, machine: dict, date: str) -> str:
    lines = ["# Benchmarks", "",
             f"Produced by `make bench` (`python -m bench.all`) on {date}. Rerun it to refresh this file; every figure "
             "below comes from one run of each benchmark, each in its own process.", "",
             "Machine: " + ", ".join(f"{k} `{v}`" for k, v in machine.items()), ""]
    for name, res in results.items():
        lines += [f"## {name}", "", describe(name), ""]
        if res.get("skipped"):
            lines += [f"_skipped: {res['skipped']}_", ""]
            continue
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in res.items()]
        lines += ["", f"`python -m bench.{name} --json`", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--no-write", action="store_true", help="print the results, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    from bench._util import machine

    names = args.only.split(",") if args.only else list(BENCHES)
    results = {}
    for name in names:
        if importlib.util.find_spec(f"bench.{name}") is None:
            results[name] = {"skipped": f"bench/{name}.py is not present"}
            continue
        print(f"bench.{name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name)
        print(json.dumps(results[name]), file=sys.stderr, flush=True)
    info = machine()
    date = datetime.date.today().isoformat()
    print(json.dumps({"date": date, "machine": info, "results": results}, indent=2))
    if not args.no_write:
        (ROOT / "BENCHMARKS.md").write_text(render(results, info, date))
        print(f"wrote {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
