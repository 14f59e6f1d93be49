"""One settings model (issue 11): RestoreSettings (the identity of a restoration) + RunOptions (how it runs), the
plan decided once from settings + model, and the flow / CLI parameters generated from the models' fields."""

from __future__ import annotations

import pytest

from flows.config import (METHODS, RUN_OPTIONS, RestoreConfig, RestoreSettings, RunOptions, plan, result_fields,
                          split_parameters)
from tasks.models import model_geometry, model_info


def test_settings_and_options_split_the_config_without_overlap():
    settings, options = set(RestoreSettings.model_fields), set(RunOptions.model_fields)
    assert not settings & options
    assert settings | options == set(RestoreConfig.model_fields)
    assert set(result_fields()) == settings and set(RUN_OPTIONS) == options
    assert "guidance_space" in result_fields() and "storage_options" in RUN_OPTIONS
    s = RestoreSettings(task="inpaint", mode="benchmark", steps=7, guidance_space="latent")
    o = RunOptions(input="clip.mp4", out="o", executor="inline", max_batch=2)
    cfg = RestoreConfig.of(s, o)
    assert cfg.settings == s and cfg.options == o
    assert (cfg.task, cfg.steps, cfg.out, cfg.executor) == ("inpaint", 7, "o", "inline")  # flat access kept


def test_identity_is_the_settings_dump_and_ignores_run_options():
    a = RestoreConfig(input="a.mp4", out="x", executor="inline", max_batch=3, device="cpu", steps=4)
    b = RestoreConfig(input="b.mp4", out="y", executor="ray", window=4, log_videos=True, steps=4)
    assert a.settings.model_dump() == b.settings.model_dump()
    assert RestoreConfig(input="a.mp4", guidance_space="latent").settings != RestoreConfig(input="a.mp4").settings
    with pytest.raises(ValueError, match="input"):
        RestoreConfig()  # restore() needs a video; the flow falls back to the sample clip itself


def test_split_parameters_of_flat_flow_parameters():
    settings, options = split_parameters({"input": "c.mp4", "steps": 3, "executor": "inline"})
    assert settings == RestoreSettings(steps=3) and options == RunOptions(input="c.mp4", executor="inline")
    with pytest.raises(ValueError, match="unknown parameters.*'stpes'"):
        split_parameters({"stpes": 3})


def test_plan_decides_noise_guidance_space_schedule_and_padding_once():
    default = RestoreSettings()
    info = model_info(default.model_name)
    p = plan(default, info)
    assert p.noise_method == "gp" and p.guided and p.guidance == RestoreSettings.model_fields["guidance"].default
    assert p.guidance_space == "pixel" and p.schedule == "wavefront"  # auto: sr8 with the linear PCA decoder
    assert p.base_noise == info["noise"] == "gp"
    assert (p.factor, p.multiple) == (model_geometry(default.model_name)["factor"], model_geometry(default.model_name)["multiple"])
    baseline = plan(RestoreSettings(method="fixed", guidance=3.0), info)
    assert baseline.noise_method == "fixed" and not baseline.guided and baseline.guidance == 0.0
    assert baseline.guidance_space == "none" and baseline.schedule == "parallel" and baseline.sample_space == "latent"
    assert plan(RestoreSettings(guidance_space="latent"), info).guidance_space == "latent"
    assert plan(RestoreSettings(guidance=0.0), info).schedule == "parallel"
    inpaint = RestoreSettings(task="inpaint", mode="benchmark")
    assert plan(inpaint, model_info(inpaint.model_name)).guidance_space == "latent"  # auto: latent off sr8


def test_plan_refuses_a_model_that_does_not_fit():
    sr8 = model_info(RestoreSettings().model_name)
    with pytest.raises(ValueError, match="trained for task 'sr8', not 'inpaint'"):
        plan(RestoreSettings(task="inpaint", mode="benchmark", model=RestoreSettings().model_name), sr8)
    with pytest.raises(ValueError, match="needs an unconditional prior"):
        plan(RestoreSettings(task="deblur", solver="dps", model=RestoreSettings().model_name), sr8)


def test_flow_parameters_come_from_the_models_with_enums_bounds_and_descriptions():
    from flows.restore_video import restore_video

    schema = restore_video.parameters.model_dump_for_openapi()
    props = schema["properties"]
    assert list(props) == [*RunOptions.model_fields, *RestoreSettings.model_fields]
    assert not schema.get("required")  # every parameter has the model's default: `--param input=...` is enough
    assert props["method"]["enum"] == list(METHODS)
    assert props["executor"]["enum"] == ["ray", "inline"]
    assert props["guidance_space"]["enum"] == ["auto", "pixel", "latent"]
    assert props["steps"]["minimum"] == 1 and props["steps"]["default"] == 50
    for model in (RunOptions, RestoreSettings):
        for name, field in model.model_fields.items():
            assert props[name]["description"] == " ".join(field.description.split()), name
            if field.default_factory is None:
                assert props[name].get("default") == field.default, name


def test_cli_flags_are_generated_from_the_fields():
    from flows.cli import build_parser

    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices["run"]._actions if a.dest == "method")
    assert tuple(run.choices) == METHODS and "noise-warping baseline" in run.help
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "x.mp4", "--executor", "gpu"])


def test_per_run_out_folder(monkeypatch):
    from flows.restore_video import per_run_out

    monkeypatch.delenv("RESTORE_VIDEO_OUT_ROOT", raising=False)
    assert per_run_out("s3://b/in/clip.mp4", "gp", "1234abcd-0000-0000-0000-000000000000") == "out/clip-gp-1234abcd"
    a, b = per_run_out("clip.mp4", "gp"), per_run_out("clip.mp4", "gp")
    assert a != b and a.startswith("out/clip-gp-")  # outside a flow run: a fresh id each time
    monkeypatch.setenv("RESTORE_VIDEO_OUT_ROOT", "/data/restored/")
    assert per_run_out("https://u:pw@h/x/my.clip.mov", "fixed", "ffffeeee") == "/data/restored/my.clip-fixed-ffffeeee"


def test_cli_respects_the_users_prefect_home(monkeypatch):
    from flows.cli import _env_defaults

    monkeypatch.delenv("PREFECT_HOME", raising=False)
    _env_defaults()
    import os

    assert "PREFECT_HOME" not in os.environ  # the user's ~/.prefect and profile (PREFECT_API_URL, Cloud) apply


def test_run_url(monkeypatch):
    from infra.tracking import run_url

    monkeypatch.delenv("RESTORE_VIDEO_MLFLOW_UI", raising=False)
    assert run_url("r1", "3", "http://mlflow:5000/") == "http://mlflow:5000/#/experiments/3/runs/r1"
    assert run_url("r1", "3", "sqlite:////tmp/mlflow.db") is None  # no UI known
    monkeypatch.setenv("RESTORE_VIDEO_MLFLOW_UI", "http://127.0.0.1:5001")
    assert run_url("r1", "3", "sqlite:////tmp/mlflow.db") == "http://127.0.0.1:5001/#/experiments/3/runs/r1"


def test_flow_refuses_credentials_in_its_parameters():
    from flows.restore_video import restore_video

    with pytest.raises(ValueError, match=r"input 's3://\*\*\*@bucket/clip.mp4' carries credentials") as err:
        restore_video.fn(input="s3://AKIAKEY:s3cr3t@bucket/clip.mp4")
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(ValueError, match="must not hold credentials"):
        restore_video.fn(input="clip.mp4", storage_options={"secret": "s3cr3t"})


def test_parameters_from_keeps_a_functions_own_parameters_first():
    import inspect

    from flows.config import parameters_from
    from prefect.utilities.callables import parameter_schema

    @parameters_from(RestoreSettings, RunOptions, exclude=("input", "out"))
    def archive_like(input_prefix: str, concurrency: int = 1, **params):
        """Restore a prefix.

        Args:
            input_prefix: where the videos are
            concurrency: videos at a time
        """
        return input_prefix, concurrency, params

    names = list(inspect.signature(archive_like).parameters)
    assert names[:2] == ["input_prefix", "concurrency"] and "input" not in names and "out" not in names
    assert set(names[2:]) == (set(RestoreSettings.model_fields) | set(RunOptions.model_fields)) - {"input", "out"}
    props = parameter_schema(archive_like).model_dump_for_openapi()["properties"]
    assert props["input_prefix"]["description"] == "where the videos are"
    assert props["solver"]["enum"] == ["conditional", "dps", "dflow", "dmplug", "vipaint"]
    assert archive_like("p", steps=3) == ("p", 1, {"steps": 3})
