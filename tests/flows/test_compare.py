"""flows.compare on a real (temporary sqlite) MLflow backend with synthetic parent/child runs of known values."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from flows import compare

# row -> seed -> summary metrics; two seeds per row so the std is non-trivial
VALUES = {
    ("warped-diffusion", "inpaint-gp"): [dict(pf=0.0011, pp=0.0004, lf=0.02, lp=0.01, psnr=24.5, ssim=0.81),
                                         dict(pf=0.0013, pp=0.0006, lf=0.03, lp=0.012, psnr=24.1, ssim=0.79)],
    ("gp", "inpaint-gp"): [dict(pf=0.061, pp=0.02, lf=0.4, lp=0.2, psnr=24.9, ssim=0.82),
                           dict(pf=0.059, pp=0.022, lf=0.42, lp=0.21, psnr=24.7, ssim=0.80)],
    ("gp", "inpaint-white"): [dict(pf=0.081, pp=0.03, lf=0.5, lp=0.3, psnr=23.0, ssim=0.70),
                              dict(pf=0.085, pp=0.031, lf=0.52, lp=0.33, psnr=23.4, ssim=0.72)],
    ("resample", "inpaint-gp"): [dict(pf=0.141, pp=0.1, lf=1.9, lp=1.8, psnr=24.0, ssim=0.78),
                                 dict(pf=0.139, pp=0.11, lf=2.0, lp=1.9, psnr=24.2, ssim=0.77)],
}
NAMES = dict(pf="warping_error_pixel_first", pp="warping_error_pixel_prev", lf="warping_error_latent_first",
             lp="warping_error_latent_prev", psnr="psnr", ssim="ssim")


def _row(method, model):
    return f"{method}/white" if model.endswith("white") else method


def _per_frame(method, seed, frames=6):
    scale = {"warped-diffusion": 0.001, "gp": 0.05, "resample": 0.14}[method]
    return [scale * (1 + 0.1 * k) + 1e-4 * seed for k in range(frames)]


@pytest.fixture
def tracked(tmp_path):
    """A temporary sqlite backend holding an older decoy parent and the real parent with 8 child runs."""
    import mlflow

    from infra import tracking

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = "compare-test"
    with tracking.start_run(exp, "old parent", tags={compare.ROLE_TAG: "experiment-parent"}, uri=uri) as old:
        with tracking.start_run(exp, "old child", tags={"method": "gp", "model": "inpaint-gp"}, nested=True):
            mlflow.log_metric("warping_error_pixel_first", 99.0)
    with tracking.start_run(exp, "parent", tags={compare.ROLE_TAG: "experiment-parent"}, uri=uri) as parent:
        for (method, model), seeds in VALUES.items():
            for seed, vals in enumerate(seeds):
                with tracking.start_run(exp, f"{method}:{model}:{seed}", nested=True,
                                        tags={"method": method, "model": model}):
                    tracking.log_config({"method": method, "model": model, "seed": seed, "guidance": 1.0, "steps": 50})
                    mlflow.log_metrics({NAMES[k]: v for k, v in vals.items()})
                    tracking.log_series(compare.PER_FRAME_METRIC, _per_frame(method, seed))
    try:
        yield uri, exp, parent.info.run_id, old.info.run_id
    finally:
        mlflow.set_tracking_uri(previous)


def test_table_equals_logged_values(tracked):
    uri, exp, parent_id, old_id = tracked
    result = compare.compare(exp, uri, "md")
    assert result["parent_run_id"] == parent_id  # the latest parent, not the decoy
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["warped-diffusion", "gp", "resample", "gp/white"]  # paper order, white rows last
    for (method, model), seeds in VALUES.items():
        row = rows[_row(method, model)]
        assert row["n"] == 2
        for short, name in NAMES.items():
            logged = np.array([s[short] for s in seeds])
            assert row[f"{name}_mean"] == pytest.approx(logged.mean(), rel=1e-12)
            assert row[f"{name}_std"] == pytest.approx(np.std(logged, ddof=1), rel=1e-9)
        assert math.isnan(row["lpips_mean"])

    # markdown: every cell as mean ± std, LPIPS footnote
    md = result["text"]
    for (method, model), seeds in VALUES.items():
        row = rows[_row(method, model)]
        line = next(l for l in md.splitlines() if l.startswith(f"| {_row(method, model)} |"))
        for name in NAMES.values():
            assert compare.cell(row, name) in line
    assert "LPIPS is not reported" in md

    # csv: full-precision means and stds parse back to the logged numbers
    parsed = {r["row"]: r for r in csv.DictReader(io.StringIO(compare.render(result["rows"], "csv")))}
    for (method, model), seeds in VALUES.items():
        for short, name in NAMES.items():
            logged = np.array([s[short] for s in seeds])
            assert float(parsed[_row(method, model)][f"{name}_mean"]) == pytest.approx(logged.mean(), rel=1e-12)
            assert float(parsed[_row(method, model)][f"{name}_std"]) == pytest.approx(np.std(logged, ddof=1), rel=1e-9)

    html = compare.render(result["rows"], "html")
    assert html.count("<tr><td>") == 4
    assert compare.cell(rows["gp/white"], "psnr").replace("±", "±") in html


def test_artifacts_logged_to_parent(tracked):
    from mlflow.tracking import MlflowClient

    uri, exp, parent_id, old_id = tracked
    compare.compare(exp, uri, "md")
    client = MlflowClient(tracking_uri=uri)
    names = {a.path for a in client.list_artifacts(parent_id, "compare")}
    assert {"compare/table.md", "compare/table.csv", "compare/table.html", "compare/summary.json",
            "compare/warping_error_per_frame.png"} <= names
    assert "compare/warping_error_vs_lambda.png" not in names  # one lambda only: no sweep plot
    assert not client.list_artifacts(old_id)
    png = client.download_artifacts(parent_id, "compare/warping_error_per_frame.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_per_frame_curves_are_seed_means(tracked):
    from mlflow.tracking import MlflowClient

    uri, exp, parent_id, _ = tracked
    result = compare.compare(exp, uri, log_artifacts=False)
    curves = compare.per_frame_curves(result["rows"], MlflowClient(tracking_uri=uri))
    steps, mean, std = curves["gp"]
    expected = np.mean([_per_frame("gp", 0), _per_frame("gp", 1)], 0)
    assert steps == list(range(6))
    np.testing.assert_allclose(mean, expected, rtol=1e-12)


def test_lambda_sweep_rows_and_plot(tmp_path):
    """Guidance-sweep rows (tagged) give one line per step count, sorted by lambda."""
    import mlflow

    from infra import tracking

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        with tracking.start_run("sweep-test", "parent", tags={compare.ROLE_TAG: "experiment-parent"}, uri=uri) as parent:
            for steps in (25, 50):
                for lam in (2.0, 0.0, 1.0):
                    row = f"warped-diffusion λ={lam:g} steps={steps}"
                    with tracking.start_run("sweep-test", row, nested=True, tags={compare.ROW_TAG: row}):
                        tracking.log_config({"method": "warped-diffusion", "guidance": lam, "steps": steps})
                        mlflow.log_metrics({"warping_error_pixel_first": 0.01 / (1 + lam), "psnr": 20.0})
        result = compare.compare("sweep-test", uri)
    finally:
        mlflow.set_tracking_uri(previous)
    series = compare.lambda_series(result["rows"])
    assert set(series) == {"25", "50"}
    assert [g for g, _, _ in series["25"]] == [0.0, 1.0, 2.0]
    assert [m for _, m, _ in series["50"]] == pytest.approx([0.01, 0.005, 0.01 / 3])
    assert "warping_error_vs_lambda.png" in result["plots"]
    assert result["parent_run_id"] == parent.info.run_id


def test_build_table_empty_and_cli_missing_experiment(tmp_path, capsys, monkeypatch):
    import argparse

    import mlflow

    assert compare.build_table(None) == []
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    try:
        rc = compare.compare_cli(argparse.Namespace(experiment="nope", format="md", work_root=str(tmp_path)))
    finally:
        mlflow.set_tracking_uri(previous)
    assert rc == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_std_dash_for_single_runs_and_rows_grouped_by_clip():
    """n = 1 prints "–" for the std (not "± 0"); rows of several clips stay apart, truth and input rows first."""
    import pandas as pd

    def run(clip, row, seed, psnr, **metrics):
        return {"run_id": f"{clip}-{row}-{seed}", "start_time": seed, "tags.restore_video.clip": clip,
                "tags.restore_video.clip_role": "report", "tags.restore_video.row": row, "metrics.psnr": psnr,
                **{f"metrics.{k}": v for k, v in metrics.items()}}

    df = pd.DataFrame([run("coffee", "gp", s, 20.0 + s, grad_ratio=0.9 + 0.01 * s) for s in range(3)]
                      + [run("coffee", "input: bicubic ×8", 0, 21.0, grad_ratio=0.5),
                         run("coffee", "truth (floor)", 0, float("nan"), warping_error_pixel_first_exact=2e-4),
                         run("rocket", "gp", 0, 25.0)])
    rows = compare.build_table(df)
    assert [(r["clip"], r["row"], r["n"]) for r in rows] == [
        ("coffee", "truth (floor)", 1), ("coffee", "input: bicubic ×8", 1), ("coffee", "gp", 3), ("rocket", "gp", 1)]
    gp = rows[2]
    assert gp["psnr_mean"] == pytest.approx(21.0) and gp["psnr_std"] == pytest.approx(1.0) and gp["psnr_n"] == 3
    assert compare.cell(gp, "psnr") == "21 ± 1"
    assert compare.cell(rows[1], "psnr") == "21 ± –" and compare.cell(rows[0], "psnr") == "–"
    same = {"psnr_mean": 29.49, "psnr_std": 4.351e-15}  # a deterministic row scored per seed: float rounding only
    assert compare.cell(same, "psnr") == "29.49 ± 0"
    text = compare.render(rows, "md")
    assert "#### clip coffee (report)" in text and "#### clip rocket (report)" in text
    assert "± 0 " not in text and "WE pixel first (exact)" in text and "grad ratio" in text
    assert set(compare.summary_json(rows)) == {"coffee: truth (floor)", "coffee: input: bicubic ×8", "coffee: gp", "rocket: gp"}


def test_footnote_names_the_model_of_every_row():
    """Which embedded model each row ran with (GP-noise rows vs the white-noise model's), read off the runs' params."""
    import pandas as pd

    def run(row, model, seed):
        return {"run_id": f"{row}-{seed}", "start_time": seed, "tags.restore_video.row": row, "metrics.psnr": 20.0,
                **({"params.model": model} if model else {})}

    df = pd.DataFrame([run("warped-diffusion", "sr8-gp", 0), run("gp", "sr8-gp", 0), run("integral/white", "sr8-white", 0),
                       run("input: bicubic ×8", None, 0)])
    note = next(n for n in compare.footnotes(compare.build_table(df)) if n.startswith("model per row"))
    assert note == ("model per row: `sr8-gp`: warped-diffusion, gp; `sr8-white`: integral/white "
                    "(input and truth rows: no model).")
    one = compare.footnotes(compare.build_table(pd.DataFrame([run("gp", "sr8-gp", 0), run("gp", "sr8-gp", 1)])))
    assert "model per row: `sr8-gp`: every method row." in one
