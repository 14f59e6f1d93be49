"""`restore-video` command line: run, demo, serve, train, models, experiment, compare, archive."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
import typing

from flows.config import PROJECT_ROOT


def _env_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(PROJECT_ROOT / ".cache" / "inductor"))


CLI_HIDDEN = ("input", "storage_options")  # a positional argument; credentials come from the environment


def _flag_type(annotation):
    """(argparse type, choices) of a RestoreConfig field's annotation: Optional[X] -> X, Literal -> its values."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, typing.get_args(annotation)
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _flag_type(args[0])
    return (annotation if annotation in (int, float, str) else str), None


def _add_restore_options(p: argparse.ArgumentParser) -> None:
    """One flag per RestoreConfig field: type, choices, help and default come from the field, written once there.
    Flags the user does not give are left out (argparse.SUPPRESS), so the model's own defaults apply."""
    from flows.config import RestoreConfig

    for name, field in RestoreConfig.model_fields.items():
        if name in CLI_HIDDEN:
            continue
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} (default: {default})".strip()
        if field.annotation is bool:
            p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
            continue
        kind, choices = _flag_type(field.annotation)
        p.add_argument("--" + name.replace("_", "-"), type=kind, choices=choices, default=argparse.SUPPRESS, help=help_text)


def _restore_params(args) -> dict:
    """The RestoreConfig fields given on the command line."""
    from flows.config import RestoreConfig

    return {k: v for k, v in vars(args).items() if k in RestoreConfig.model_fields and k not in CLI_HIDDEN}


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from flows.restore_video import quality_rows

    print(f"restored {report['frames']} frames ({report['task']}, {report['method']})")
    header, rows = quality_rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  " + "  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(row)))
    print(f"  stages cached: {sum(report['cached'].values())}/{len(report['cached'])}   total {report['timings_s'].get('total', 0):.1f} s")
    for name, url in report["outputs"].items():
        print(f"  {name:18s} {url}")
    print(f"  MLflow run {report['mlflow_run_id']}  ({report['mlflow_tracking_uri']}; `mlflow ui --backend-store-uri {report['mlflow_tracking_uri']}`)")


def cmd_run(args) -> int:
    """Validate the settings, then run the `restore-video` flow (on PREFECT_API_URL / the active profile's API, else
    on a temporary local server: infra.prefect_server.prefect_api). Bad input: one line `error: ...` with the cause,
    exit code 2."""
    from pydantic import ValidationError

    from flows.config import RestoreConfig

    params = {"input": args.input, **_restore_params(args)}
    try:
        RestoreConfig(**params)  # before a flow run exists: bad flags never reach Prefect
    except ValidationError as exc:
        print("error: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()), file=sys.stderr)
        return 2
    from flows.restore_video import restore_video
    from infra.prefect_server import prefect_api

    try:
        with prefect_api(announce=lambda m: print(m, file=sys.stderr, flush=True)), _console_quiet_about_exceptions():
            report = restore_video(**params)  # the console drops Prefect's copy of an error; the API keeps it
    except ValueError as exc:  # bad input: VideoError and friends -> one line with the cause
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # any other exception propagates: its traceback is printed once, by Python
    _print_report(report, args.json)
    return 0


@contextlib.contextmanager
def _console_quiet_about_exceptions():
    """While the flow runs, the console handlers drop the records that carry an exception (the engine's
    "Encountered exception" traceback) and the "Finished in state Failed" that follows: the CLI reports that
    error once itself. The records still reach the API (the flow run's logs in the UI)."""
    import logging

    class _Drop(logging.Filter):
        hid_error = False

        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and record.exc_info[1] is not None:
                self.hid_error = True
                return False
            return not (self.hid_error and "Finished in state Failed" in record.getMessage())

    # Prefect's console handler sits on the root logger (its own loggers propagate to it)
    handlers = [h for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")
                for h in logging.getLogger(name).handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    drop = _Drop()
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)


def cmd_demo(args) -> int:
    from flows.restore_video import ensure_sample_clip

    args.input = ensure_sample_clip()
    args.mode = "benchmark"
    args.out = getattr(args, "out", None) or str(PROJECT_ROOT / "out" / "demo")
    return cmd_run(args)


def cmd_models(args) -> int:
    from storage.models import list_models

    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
    else:
        for name, info in models.items():
            print(f"{name:16s} task={info['task']:8s} noise={str(info['noise']):6s} params={info['params']:>9,d}  eval={info.get('eval', {})}")
    return 0


def cmd_train(argv: list[str]) -> int:
    from flows.train_denoiser import cli

    return cli(argv)


def cmd_serve(args) -> int:
    from infra.prefect_server import PrefectServer, ProcessWorker, deploy_all
    from infra.tracking import MlflowUI
    from flows.config import DEFAULT_WORK_ROOT

    home = PROJECT_ROOT / ".prefect-server"
    with PrefectServer(home, ui=True) as server, MlflowUI(DEFAULT_WORK_ROOT) as ui:
        # RESTORE_VIDEO_MLFLOW_UI: flow runs link their summary artifact to their run on this UI
        env = {**server.env(), "RESTORE_VIDEO_ROOT": str(PROJECT_ROOT), "RAY_AUTH_MODE": "disabled",
               "RESTORE_VIDEO_MLFLOW_UI": ui.url}
        deploy_all(str(PROJECT_ROOT), env)
        with ProcessWorker("restore-video-pool", env, cwd=str(PROJECT_ROOT)):
            _serve_forever(server, ui)
    return 0


def _serve_forever(server, ui) -> None:
    import time

    print(f"Prefect UI   {server.api_url.removesuffix('/api')}")
    print(f"Prefect API  {server.api_url}   (export PREFECT_API_URL={server.api_url})")
    print(f"MLflow UI    {ui.url}")
    print("deployments: restore-video/default, restore-archive/nightly   (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def cmd_archive(args) -> int:
    from flows.restore_archive import archive_cli

    return archive_cli(args)


def cmd_experiment(args) -> int:
    from flows.experiments import experiment_cli

    return experiment_cli(args)


def cmd_compare(args) -> int:
    from flows.compare import compare_cli

    return compare_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="restore-video", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="restore one video")
    p.add_argument("input", help="video path or fsspec URL")
    _add_restore_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("demo", help="restore the embedded sample clip (8x super-resolution benchmark)")
    _add_restore_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("models", help="list the available models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_models)
    p = sub.add_parser("serve", help="Prefect server + process worker + MLflow UI on 127.0.0.1, deployments registered")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("archive", help="restore every video under a prefix (local, s3://, ...) into --out; exit 0: "
                                       "all restored or skipped, 1: some videos failed (listed), 2: bad arguments")
    p.add_argument("input_prefix")
    p.add_argument("--glob", default=None, help="which files under the prefix are videos (default: the usual video extensions, any depth)")
    p.add_argument("--concurrency", type=int, default=1, help="videos restored at once (Prefect task runs)")
    _add_restore_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_archive)
    p = sub.add_parser("experiment", help="reproduce a paper comparison as MLflow runs: shift-inpaint, video-sr, "
                                          "guidance-sweep, or all (the sweep tunes, video-sr reports); zero-shot; "
                                          "real-clips (the shipped defaults on wide clips with film damage)")
    p.add_argument("name")
    p.add_argument("--input", default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="warped-diffusion's lambda (default: the experiment's)")
    p.add_argument("--guidance-space", default=None, help="pixel | latent | auto (default: the sweep's pick / the experiment's)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--task", default=None, help="SR task of video-sr and guidance-sweep (default sr8)")
    p.add_argument("--family", default="pca", choices=["pca", "res"],
                   help="models: pca = {task}-gp/-white (the tables of `make experiments`), res = {task}-res-gp/-white "
                        "(regression + residual diffusion: the shipped defaults); res runs as NAME-res")
    p.add_argument("--lambdas", default=None, help="guidance-sweep's λ grid, comma-separated (default 0,0.5,1,2)")
    p.add_argument("--sweep-steps", default=None, help="guidance-sweep's step counts, comma-separated (default 25,50)")
    p.add_argument("--tune-image", default=None, help="photograph of the guidance sweep's clip (default rocket)")
    p.add_argument("--report-images", default=None, help="comma-separated photographs of video-sr's clips (default coffee,motorcycle_right)")
    p.add_argument("--update-doc", default=None, help="write each table into this markdown file (e.g. EXPERIMENTS.md)")
    p.add_argument("--iterations", type=int, default=None, help="zero-shot: dflow / vipaint iterations (default: run's)")
    p.add_argument("--size", type=int, default=None, help="side of the rendered report/tuning clips in pixels (default 256; "
                                                                    "real-clips: the width, default 640)")
    p.add_argument("--work-root", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_experiment)
    p = sub.add_parser("compare", help="paper-style table of an experiment from MLflow")
    p.add_argument("--experiment", required=True)
    p.add_argument("--format", default="md", choices=["md", "csv", "html"])
    p.add_argument("--work-root", default=None)
    p.set_defaults(fn=cmd_compare)
    sub.add_parser("train", help="train the embedded models (see `restore-video train --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from infra._proc import install_cleanup

    install_cleanup()  # servers this command starts stop with it, also on SIGTERM
    _env_defaults()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's own usage errors (exit 2, message printed) and --help (0)
        return int(exc.code or 0)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
