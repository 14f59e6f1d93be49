"""Every benchmark, each in its own process (`python -m bench.<name> --json`), then BENCHMARKS.md rewritten
with the figures, the machine and the date.

python -m bench.all [--only noise_warp,sampling] [--no-write]

BENCHMARKS.md is updated section by section (`merge`): a benchmark's `## NAME` section is replaced, the others
(hand-written notes, benchmarks not rerun) stay with their own dates.
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


HEADER = ("# Benchmarks\n\nProduced by `make bench` (`python -m bench.all`; `--only a,b` reruns some). Each section "
          "comes from one run of its benchmark in its own process and says when and on what machine it ran; "
          "`--only` replaces just those sections, so sections of different dates can stand side by side.\n")


def section(name: str, res: dict, machine: dict, date: str) -> str:
    """One benchmark's markdown section: heading, what it measures, when and where, the figures, the command."""
    lines = [f"## {name}", "", describe(name), "",
             f"Measured {date}; machine: " + ", ".join(f"{k} `{v}`" for k, v in machine.items()), ""]
    if res.get("skipped"):
        return "\n".join(lines + [f"_skipped: {res['skipped']}_"])
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in res.items()]
    lines += ["", f"`python -m bench.{name} --json`"]
    return "\n".join(lines)


def merge(doc: str, sections: dict[str, str]) -> str:
    """Replace each `## NAME` section of `doc` (its heading up to the next `## ` heading) by `sections[NAME]`;
    sections not in `doc` are appended, every other section (hand-written ones too) is kept as it is."""
    import re

    doc = doc if doc.strip() else HEADER
    for name, text in sections.items():
        m = re.search(rf"^## {re.escape(name)}[ \t]*\n", doc, flags=re.M)
        if m is None:
            doc = doc.rstrip() + "\n\n" + text.rstrip() + "\n"
            continue
        nxt = re.search(r"^## ", doc[m.end():], flags=re.M)
        end = m.end() + nxt.start() if nxt else len(doc)
        doc = doc[: m.start()] + text.rstrip() + ("\n\n" if nxt else "\n") + doc[end:]
    return doc


def render(results: dict, machine: dict, date: str, doc: str = "") -> str:
    """BENCHMARKS.md: `doc` (the current file, or "" for a fresh one) with the sections of `results` replaced."""
    return merge(doc, {name: section(name, res, machine, date) for name, res in results.items()})


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
        path = ROOT / "BENCHMARKS.md"
        path.write_text(render(results, info, date, path.read_text() if path.exists() else ""))
        print(f"wrote {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
