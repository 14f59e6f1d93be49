"""`restore-video compare --experiment NAME`: the paper-style table of an experiment's MLflow runs, and its plots.

Reads the child runs of the experiment's latest parent run (`mlflow.search_runs`), groups them into rows
(method, `<method>/white` for white-noise models, `lambda=…, steps=…` for the guidance sweep), and reports
mean ± std over seeds of the four warping errors, PSNR and SSIM. Plots (paper Fig. 3: warping error per frame
for each row; warping error vs lambda) and the table in md/csv/html are logged as artifacts of the parent run.

    rows = build_table(runs_df)            # pure: a DataFrame from mlflow.search_runs -> list of dicts
    print(render(rows, "md"))
"""

from __future__ import annotations

import io
import math
import os
import sys
import tempfile

import numpy as np

from flows.config import METHODS

METRICS = (
    "warping_error_pixel_first",
    "warping_error_pixel_prev",
    "warping_error_latent_first",
    "warping_error_latent_prev",
    "psnr",
    "ssim",
)
OPTIONAL_METRICS = ("hole_psnr", "lpips")
HEADERS = {
    "warping_error_pixel_first": "WE pixel first",
    "warping_error_pixel_prev": "WE pixel prev",
    "warping_error_latent_first": "WE latent first",
    "warping_error_latent_prev": "WE latent prev",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "hole_psnr": "hole PSNR (dB)",
    "lpips": "LPIPS",
}
PER_FRAME_METRIC = "per_frame_warping_error_pixel_first"
LPIPS_FOOTNOTE = ("LPIPS is not reported: no LPIPS weights are present locally, and this project never downloads "
                  "weights at run time.")
ROLE_TAG = "restore_video.role"  # "experiment-parent" on parent runs made by flows.experiments
ROW_TAG = "restore_video.row"  # the table row of a child run (set by flows.experiments)


# ---------------------------------------------------------------------------------------------------------------
# 1. pure table building


def _col(df, name: str):
    return df[name] if name in df.columns else None


def row_key(run: dict) -> str:
    """The table row of one run: its `restore_video.row` tag, else method (+ `/white` for a white-noise model)."""
    tagged = run.get(f"tags.{ROW_TAG}")
    if isinstance(tagged, str) and tagged:
        return tagged
    method = run.get("tags.method") or run.get("params.method") or "?"
    model = str(run.get("tags.model") or run.get("params.model") or "")
    return f"{method}/white" if model.endswith("white") else str(method)


def _order(key: str) -> tuple:
    """Paper order: methods as in METHODS (warped-diffusion first), GP models before white, sweep by steps, lambda."""
    import re

    sweep = re.fullmatch(r"λ=([-\d.e]+) steps=(\d+)", key)
    if sweep:
        return (False, -1, int(sweep.group(2)), float(sweep.group(1)), key)
    base, _, variant = key.partition("/")
    rank = METHODS.index(base) if base in METHODS else len(METHODS)
    return (variant == "white", rank, 0, 0.0, key)


def _std(values: np.ndarray) -> float:
    """Sample standard deviation over seeds (ddof=1); 0 for a single run."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def build_table(runs_df) -> list[dict]:
    """Runs (a `mlflow.search_runs` DataFrame) -> rows `{row, n, <metric>_mean, <metric>_std, guidance, steps}`.

    Metrics absent from every run of a row (e.g. PSNR in restore mode, LPIPS) are NaN in that row.
    """
    if runs_df is None or len(runs_df) == 0:
        return []
    records = runs_df.to_dict("records")
    groups: dict[str, list[dict]] = {}
    for run in records:
        groups.setdefault(row_key(run), []).append(run)
    rows = []
    for key in sorted(groups, key=_order):
        runs = groups[key]
        row = {"row": key, "n": len(runs)}
        for metric in METRICS + OPTIONAL_METRICS:
            values = np.array([float(r.get(f"metrics.{metric}", float("nan"))) for r in runs], dtype=float)
            values = values[~np.isnan(values)]
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = _std(values) if len(values) else float("nan")
        for param in ("guidance", "steps", "method", "model"):
            vals = {str(r.get(f"params.{param}")) for r in runs if r.get(f"params.{param}") is not None}
            row[param] = vals.pop() if len(vals) == 1 else None
        row["run_ids"] = [r["run_id"] for r in runs]
        rows.append(row)
    return rows


def present_metrics(rows: list[dict]) -> list[str]:
    """The metric columns worth printing: the fixed six, then optional ones that some row has."""
    cols = list(METRICS)
    for metric in OPTIONAL_METRICS:
        if any(not math.isnan(r[f"{metric}_mean"]) for r in rows):
            cols.append(metric)
    return cols


def fmt(value: float) -> str:
    """Four significant digits (warping errors span 1e-5..1e-1); NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}"


def cell(row: dict, metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if math.isnan(mean):
        return "–"
    return f"{fmt(mean)} ± {fmt(std)}"


def footnotes(rows: list[dict]) -> list[str]:
    notes = ["mean ± sample std (ddof=1) over seeds; n = runs per row. WE = self-warping error (mean squared difference "
             "of frame j warped onto the first / previous frame, valid pixels; pixel space in [0,1] RGB)."]
    if all(math.isnan(r["lpips_mean"]) for r in rows):
        notes.append(LPIPS_FOOTNOTE)
    return notes


def render(rows: list[dict], fmt_name: str = "md", title: str | None = None) -> str:
    """The table as markdown (mean ± std cells), csv (separate full-precision mean/std columns) or html."""
    cols = present_metrics(rows)
    if fmt_name == "csv":
        import csv

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["row", "n"] + [f"{m}_{s}" for m in cols for s in ("mean", "std")])
        for r in rows:
            writer.writerow([r["row"], r["n"]] + [repr(r[f"{m}_{s}"]) for m in cols for s in ("mean", "std")])
        return buf.getvalue()
    if fmt_name == "html":
        import html

        head = "".join(f"<th>{html.escape(HEADERS[m])}</th>" for m in cols)
        body = "".join(
            f"<tr><td>{html.escape(r['row'])}</td><td>{r['n']}</td>"
            + "".join(f"<td>{html.escape(cell(r, m))}</td>" for m in cols) + "</tr>\n"
            for r in rows
        )
        caption = f"<caption>{html.escape(title)}</caption>" if title else ""
        notes = "".join(f"<p><small>{html.escape(n)}</small></p>" for n in footnotes(rows))
        return (f"<table>{caption}<thead><tr><th>method</th><th>n</th>{head}</tr></thead>\n"
                f"<tbody>\n{body}</tbody></table>\n{notes}\n")
    if fmt_name != "md":
        raise ValueError(f"unknown format {fmt_name!r}; expected md, csv or html")
    lines = [f"### {title}", ""] if title else []
    lines.append("| method | n | " + " | ".join(HEADERS[m] for m in cols) + " |")
    lines.append("|---|---:|" + "---:|" * len(cols))
    for r in rows:
        lines.append(f"| {r['row']} | {r['n']} | " + " | ".join(cell(r, m) for m in cols) + " |")
    lines.append("")
    lines += [f"- {n}" for n in footnotes(rows)]
    return "\n".join(lines) + "\n"


def summary_json(rows: list[dict]) -> dict:
    """`{"<row>": {"warping_error_pixel_first": mean, "warping_error_pixel_prev": …, "psnr": …, "ssim": …}}`."""
    keys = ("warping_error_pixel_first", "warping_error_pixel_prev", "warping_error_latent_first",
            "warping_error_latent_prev", "psnr", "ssim")
    out = {}
    for r in rows:
        out[r["row"]] = {k: (None if math.isnan(r[f"{k}_mean"]) else r[f"{k}_mean"]) for k in keys}
        out[r["row"]]["n"] = r["n"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. MLflow I/O


def latest_parent(experiment: str, client) -> tuple[object, object]:
    """(experiment, parent run) of the newest parent run that has children, preferring runs tagged as parents."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r}; run `restore-video experiment {experiment}` first")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'experiment-parent'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    if not runs:  # parents made by hand: any top-level run with children
        runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500)
                if "mlflow.parentRunId" not in r.data.tags]
    for run in runs:
        if client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                              max_results=1):
            return exp, run
    raise LookupError(f"experiment {experiment!r} has no parent run with nested runs")


def child_runs(experiment_id: str, parent_id: str):
    """The finished child runs of `parent_id` as a DataFrame (mlflow.search_runs)."""
    import mlflow

    df = mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                            output_format="pandas", max_results=10000)
    if len(df) and "status" in df.columns:
        df = df[df["status"] == "FINISHED"]
    return df


def per_frame_curves(rows: list[dict], client, metric: str = PER_FRAME_METRIC) -> dict[str, tuple[list, list, list]]:
    """Row -> (frames, mean over seeds, std over seeds) of a per-frame metric history (step = frame index)."""
    curves = {}
    for r in rows:
        series = []
        for run_id in r["run_ids"]:
            hist = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
            if hist:
                series.append({m.step: m.value for m in hist})
        if not series:
            continue
        steps = sorted(set().union(*series))
        values = np.array([[s.get(k, np.nan) for k in steps] for s in series])
        curves[r["row"]] = (steps, np.nanmean(values, 0).tolist(),
                            (np.nanstd(values, 0, ddof=1) if len(series) > 1 else np.zeros(len(steps))).tolist())
    return curves


def plot_per_frame(curves: dict, title: str) -> bytes:
    """Paper Fig. 3: warping error (pixel, w.r.t. the first frame) per frame, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, (steps, mean, std)) in enumerate(curves.items()):
        frames = np.asarray(steps) + 1  # per-frame warping errors start at frame 1 (frame 0 is the reference)
        mean, std = np.asarray(mean), np.asarray(std)
        base = name.partition("/")[0]
        color = f"C{METHODS.index(base)}" if base in METHODS else plt.cm.viridis(i / max(len(curves) - 1, 1))
        ax.plot(frames, mean, marker="o", ms=3, label=name, color=color, ls="--" if name.endswith("/white") else "-")
        if std.any():
            ax.fill_between(frames, np.clip(mean - std, mean.min() / 10, None), mean + std, color=color, alpha=0.12)
    ax.set_yscale("log")
    ax.set_xlabel("frame")
    ax.set_ylabel("warping error w.r.t. first frame (pixel)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def lambda_series(rows: list[dict], metric: str = "warping_error_pixel_first") -> dict[str, list[tuple]]:
    """steps -> [(lambda, mean, std)] sorted by lambda, over warped-diffusion rows with a guidance param."""
    out: dict[str, list[tuple]] = {}
    for r in rows:
        if r.get("guidance") is None or r.get("method") not in (None, "warped-diffusion"):
            continue
        out.setdefault(str(r.get("steps")), []).append((float(r["guidance"]), r[f"{metric}_mean"], r[f"{metric}_std"]))
    return {k: sorted(v) for k, v in out.items() if len({g for g, _, _ in v}) > 1}


def plot_vs_lambda(series: dict, title: str) -> bytes:
    """Warping error (pixel, first frame) vs guidance strength lambda, one line per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for steps, pts in sorted(series.items(), key=lambda kv: float(kv[0]) if kv[0] not in ("None",) else 0):
        g, m, s = (np.array(v) for v in zip(*pts))
        ax.errorbar(g, m, yerr=s, marker="o", capsize=3, label=f"{steps} steps")
    ax.set_xlabel("self-guidance strength λ")
    ax.set_ylabel("warping error w.r.t. first frame (pixel)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def compare(experiment: str, uri: str | None = None, fmt_name: str = "md", log_artifacts: bool = True) -> dict:
    """Build the table of `experiment`'s latest parent run, log table + plots to it; returns rows, text, artifacts."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri:
        mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp, parent = latest_parent(experiment, client)
    df = child_runs(exp.experiment_id, parent.info.run_id)
    rows = build_table(df)
    title = f"{experiment} (parent run {parent.info.run_id[:8]})"
    texts = {name: render(rows, name, title) for name in ("md", "csv", "html")}
    plots = {}
    curves = per_frame_curves(rows, client)
    if curves:
        plots["warping_error_per_frame.png"] = plot_per_frame(curves, f"{experiment}: warping error per frame")
    series = lambda_series(rows)
    if series:
        plots["warping_error_vs_lambda.png"] = plot_vs_lambda(series, f"{experiment}: warping error vs λ")
    artifacts = []
    if log_artifacts:
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in texts.items():
                path = os.path.join(tmp, f"table.{name}")
                with open(path, "w") as f:
                    f.write(text)
                client.log_artifact(parent.info.run_id, path, artifact_path="compare")
                artifacts.append(f"compare/table.{name}")
            for name, data in plots.items():
                path = os.path.join(tmp, name)
                with open(path, "wb") as f:
                    f.write(data)
                client.log_artifact(parent.info.run_id, path, artifact_path="compare")
                artifacts.append(f"compare/{name}")
            import json

            path = os.path.join(tmp, "summary.json")
            with open(path, "w") as f:
                json.dump(summary_json(rows), f, indent=2)
            client.log_artifact(parent.info.run_id, path, artifact_path="compare")
            artifacts.append("compare/summary.json")
    return {"experiment": experiment, "parent_run_id": parent.info.run_id, "rows": rows, "text": texts[fmt_name],
            "artifacts": artifacts, "plots": sorted(plots), "tracking_uri": mlflow.get_tracking_uri()}


def compare_cli(args) -> int:
    """`restore-video compare --experiment NAME [--format md|csv|html] [--work-root DIR]`."""
    from flows.config import DEFAULT_WORK_ROOT
    from infra.tracking import tracking_uri

    uri = tracking_uri(args.work_root or DEFAULT_WORK_ROOT)
    try:
        result = compare(args.experiment, uri, args.format)
    except LookupError as exc:
        print(f"error: {exc} (tracking URI {uri})", file=sys.stderr)
        return 2
    print(result["text"], end="")
    print(f"\nlogged {', '.join(result['artifacts'])} to parent run {result['parent_run_id']} ({uri})", file=sys.stderr)
    return 0
