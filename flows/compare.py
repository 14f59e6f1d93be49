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
EXACT_METRICS = tuple(f"{m}_exact" for m in METRICS[:4])  # the same warping errors against the exact flow
SHARPNESS_METRICS = ("grad_ratio", "blockiness", "noise_sigma")
OPTIONAL_METRICS = EXACT_METRICS + SHARPNESS_METRICS + ("hole_psnr", "lpips", "seconds_per_frame")
HEADERS = {
    "warping_error_pixel_first": "WE pixel first",
    "warping_error_pixel_prev": "WE pixel prev",
    "warping_error_latent_first": "WE latent first",
    "warping_error_latent_prev": "WE latent prev",
    **{f"{m}_exact": f"{h} (exact)" for m, h in (("warping_error_pixel_first", "WE pixel first"),
                                                 ("warping_error_pixel_prev", "WE pixel prev"),
                                                 ("warping_error_latent_first", "WE latent first"),
                                                 ("warping_error_latent_prev", "WE latent prev"))},
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "grad_ratio": "grad ratio",
    "blockiness": "blockiness",
    "noise_sigma": "noise σ (NR)",
    "hole_psnr": "hole PSNR (dB)",
    "lpips": "LPIPS",
    "seconds_per_frame": "s/frame (sampling)",
}
PER_FRAME_METRIC = "per_frame_warping_error_pixel_first"
LPIPS_FOOTNOTE = ("LPIPS is not reported: no LPIPS weights are present locally, and this project never downloads "
                  "weights at run time.")
ROLE_TAG = "restore_video.role"  # "experiment-parent" on parent runs made by flows.experiments
ROW_TAG = "restore_video.row"  # the table row of a child run (set by flows.experiments)
CLIP_TAG = "restore_video.clip"  # the clip a child run is on, and its role (tuning | report)
CLIP_ROLE_TAG = "restore_video.clip_role"
TRUTH_ROW = "truth (floor)"  # flows.experiments' rows of the ground truth and of the input itself
INPUT_PREFIX = "input: "


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
    """Truth (floor), then the input rows, then paper order: methods as in METHODS (warped-diffusion first), GP
    models before white; the sweep by steps, space, lambda."""
    import re

    if key == TRUTH_ROW:
        return (-2, False, 0, 0, "", 0.0, key)
    if key.startswith(INPUT_PREFIX):
        return (-1, False, 0, 0, "", 0.0, key)
    sweep = re.fullmatch(r"λ=([-\d.e]+) steps=(\d+)(?: space=(\w+))?", key)
    if sweep:
        return (0, False, -1, int(sweep.group(2)), sweep.group(3) or "", float(sweep.group(1)), key)
    base, _, variant = key.partition("/")
    rank = METHODS.index(base) if base in METHODS else len(METHODS)
    return (0, variant == "white", rank, 0, "", 0.0, key)


def _std(values: np.ndarray) -> float:
    """Sample standard deviation over seeds (ddof=1); NaN (printed "–") for a single run."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def build_table(runs_df) -> list[dict]:
    """Runs (a `mlflow.search_runs` DataFrame) -> rows `{row, clip, role, n, <metric>_mean, <metric>_std,
    <metric>_n, guidance, steps, space}`, grouped by (clip, row), clips in order of appearance.

    Metrics absent from every run of a row (e.g. PSNR in restore mode, LPIPS) are NaN in that row.
    """
    if runs_df is None or len(runs_df) == 0:
        return []
    records = runs_df.to_dict("records")
    groups: dict[tuple, list[dict]] = {}
    clips: list[str] = []
    for run in sorted(records, key=lambda r: str(r.get("start_time", ""))):
        clip = run.get(f"tags.{CLIP_TAG}")
        clip = clip if isinstance(clip, str) and clip else ""
        if clip not in clips:
            clips.append(clip)
        groups.setdefault((clip, row_key(run)), []).append(run)
    rows = []
    for clip, key in sorted(groups, key=lambda ck: (clips.index(ck[0]), _order(ck[1]))):
        runs = groups[(clip, key)]
        role = {str(r.get(f"tags.{CLIP_ROLE_TAG}")) for r in runs if isinstance(r.get(f"tags.{CLIP_ROLE_TAG}"), str)}
        row = {"row": key, "clip": clip, "role": role.pop() if len(role) == 1 else "", "n": len(runs)}
        for metric in METRICS + OPTIONAL_METRICS:
            values = np.array([float(r.get(f"metrics.{metric}", float("nan"))) for r in runs], dtype=float)
            values = values[~np.isnan(values)]
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = _std(values) if len(values) else float("nan")
            row[f"{metric}_n"] = len(values)
        for param, name in (("guidance", "guidance"), ("steps", "steps"), ("method", "method"), ("model", "model"),
                            ("guidance_space", "space")):
            vals = {str(v) for r in runs if (v := r.get(f"params.{param}")) is not None and v == v}  # NaN: absent
            row[name] = vals.pop() if len(vals) == 1 else None
        row["run_ids"] = [r["run_id"] for r in runs]
        rows.append(row)
    return rows


def present_metrics(rows: list[dict]) -> list[str]:
    """The metric columns worth printing: the fixed six and the optional ones some row has (exact-flow warping errors
    after the estimated ones, sharpness after PSNR/SSIM)."""
    order = METRICS[:4] + EXACT_METRICS + METRICS[4:] + SHARPNESS_METRICS + ("hole_psnr", "lpips", "seconds_per_frame")
    return [m for m in order if m in METRICS or any(not math.isnan(r[f"{m}_mean"]) for r in rows)]


def fmt(value: float) -> str:
    """Four significant digits (warping errors span 1e-5..1e-1); NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}"


def cell(row: dict, metric: str) -> str:
    """`mean ± std`; the std is "–" when only one run has the metric (n = 1), 0 when the runs agree to float
    rounding (a deterministic row scored once per seed)."""
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if math.isnan(mean):
        return "–"
    if not math.isnan(std) and std <= 1e-9 * abs(mean):
        std = 0.0
    return f"{fmt(mean)} ± {fmt(std)}"


def footnotes(rows: list[dict]) -> list[str]:
    notes = ["mean ± sample std (ddof=1) over seeds (– when n = 1); n = runs per row. WE = self-warping error (mean "
             "squared difference of frame j warped onto the first / previous frame, valid pixels; pixel space in [0,1] "
             "RGB), against the flow estimated on the input (DIS, what the guidance uses) and, marked (exact), against "
             "the clip's exact motion."]
    if any(r["row"] == TRUTH_ROW for r in rows):
        notes.append(f"`{TRUTH_ROW}`: the ground-truth clip itself scored against each flow, the warping error a "
                     "perfect restoration would get (the exact-flow floor is what interpolation of the rendered "
                     "frames leaves); `input: …` rows: the model's input scored like a method (deterministic for SR: "
                     "n = 1, or one run per seed with std 0 where the experiment logs them per seed).")
    if any(not math.isnan(r["grad_ratio_mean"]) for r in rows):
        notes.append("grad ratio: mean gradient magnitude over the truth's (1 = as sharp; < 1 blurrier, which PSNR "
                     "rewards). blockiness: mean |pixel difference| across 8-px cell borders over the mean elsewhere, "
                     "restored over truth (1 = no block artefacts). noise σ (NR): no-reference noise level (Immerkær 1996: "
                     "the std of white noise explaining the frames' response to a Laplacian-difference mask, [0, 1] "
                     "scale); compare with the truth row's own level: above it = grain/diffusion noise, below = blur.")
    models: dict[str, list[str]] = {}
    for r in rows:
        if r.get("model"):
            models.setdefault(r["model"], [])
            if r["row"] not in models[r["model"]]:
                models[r["model"]].append(r["row"])
    if models:
        one = len(models) == 1
        notes.append("model per row: " + "; ".join(f"`{m}`: {'every method row' if one else ', '.join(rs)}"
                                                   for m, rs in models.items())
                     + (" (input and truth rows: no model)" if any(r["row"] == TRUTH_ROW or r["row"].startswith(INPUT_PREFIX)
                                                                for r in rows) else "") + ".")
    if all(math.isnan(r["lpips_mean"]) for r in rows):
        notes.append(LPIPS_FOOTNOTE)
    return notes


def clip_title(row: dict) -> str:
    return f"clip {row['clip']}" + (f" ({row['role']})" if row.get("role") else "")


def render(rows: list[dict], fmt_name: str = "md", title: str | None = None) -> str:
    """The table as markdown (mean ± std cells), csv (separate full-precision mean/std columns) or html."""
    cols = present_metrics(rows)
    if fmt_name == "csv":
        import csv

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["clip", "role", "row", "n"] + [f"{m}_{s}" for m in cols for s in ("mean", "std")])
        for r in rows:
            writer.writerow([r.get("clip", ""), r.get("role", ""), r["row"], r["n"]]
                            + [repr(r[f"{m}_{s}"]) for m in cols for s in ("mean", "std")])
        return buf.getvalue()
    if fmt_name == "html":
        import html

        head = "".join(f"<th>{html.escape(HEADERS[m])}</th>" for m in cols)
        body = "".join(
            f"<tr><td>{html.escape((r.get('clip') + ': ') if r.get('clip') else '')}{html.escape(r['row'])}</td><td>{r['n']}</td>"
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
    clips = list(dict.fromkeys(r.get("clip", "") for r in rows))
    for clip in clips:
        part = [r for r in rows if r.get("clip", "") == clip]
        if clip:
            lines += [f"#### {clip_title(part[0])}", ""]
        lines.append("| method | n | " + " | ".join(HEADERS[m] for m in cols) + " |")
        lines.append("|---|---:|" + "---:|" * len(cols))
        for r in part:
            lines.append(f"| {r['row']} | {r['n']} | " + " | ".join(cell(r, m) for m in cols) + " |")
        lines.append("")
    lines += [f"- {n}" for n in footnotes(rows)]
    return "\n".join(lines) + "\n"


def summary_json(rows: list[dict]) -> dict:
    """`{"<row>": {"warping_error_pixel_first": mean, …, "psnr": …, "ssim": …, "n": …}}`; rows of several clips are
    keyed `<clip>: <row>`."""
    keys = METRICS + OPTIONAL_METRICS
    several = len({r.get("clip", "") for r in rows}) > 1
    out = {}
    for r in rows:
        name = f"{r['clip']}: {r['row']}" if several else r["row"]
        out[name] = {k: (None if math.isnan(r[f"{k}_mean"]) else r[f"{k}_mean"]) for k in keys}
        out[name]["n"] = r["n"]
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
        several = len({x.get("clip", "") for x in rows}) > 1
        curves[f"{r['clip']}: {r['row']}" if several else r["row"]] = (steps, np.nanmean(values, 0).tolist(),
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
    """"<steps>[ <space>]" -> [(lambda, mean, std)] sorted by lambda, over warped-diffusion rows with a guidance param."""
    out: dict[str, list[tuple]] = {}
    for r in rows:
        if r.get("guidance") is None or r.get("method") not in (None, "warped-diffusion"):
            continue
        label = str(r.get("steps")) + (f" {r['space']}" if r.get("space") else "")
        out.setdefault(label, []).append((float(r["guidance"]), r[f"{metric}_mean"], r[f"{metric}_std"]))
    return {k: sorted(v) for k, v in out.items() if len({g for g, _, _ in v}) > 1}


def plot_vs_lambda(series: dict, title: str) -> bytes:
    """Warping error (pixel, first frame) vs guidance strength lambda, one line per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for steps, pts in sorted(series.items(), key=lambda kv: (float(kv[0].split()[0]) if kv[0].split()[0] != "None" else 0, kv[0])):
        g, m, s = (np.array(v) for v in zip(*pts))
        ax.errorbar(g, m, yerr=np.nan_to_num(s), marker="o", capsize=3, label=f"{steps.replace(' ', ' steps, ', 1) if ' ' in steps else steps + ' steps'}")
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

    from infra import tracking

    if uri:
        tracking.use_tracking_uri(uri)
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
