"""prepare and the output stage stream: prepare and the metrics computed chunk by chunk equal the whole-video results, the writers
read stored chunks of frames."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ops import flow as flowops
from ops import metrics
from tasks import metrics as metrics_stage
from tasks import outputs
from tasks._stage import frame_chunks


def _datasets(f=7, h=20, w=24, seed=0):
    rng = np.random.default_rng(seed)
    frames = (rng.random((f, h, w, 3)) * 255).astype(np.uint8)
    truth = (rng.random((f, h + 4, w + 8, 3)) * 255).astype(np.uint8)  # padded, cropped by the metrics
    mask = (rng.random((f, h + 4, w + 8)) > 0.7).astype(np.uint8)
    fwd = torch.from_numpy(rng.normal(0, 1.5, (f - 1, h + 4, w + 8, 2)))
    bwd = -fwd
    valid = flowops.occlusion_mask(fwd, bwd) & torch.from_numpy(rng.random((f - 1, h + 4, w + 8)) > 0.1)
    lat = rng.normal(size=(f, 4, (h + 4) // 4, (w + 8) // 4))
    lfwd = torch.from_numpy(rng.normal(0, 0.5, (f - 1, (h + 4) // 4, (w + 8) // 4, 2)))
    lvalid = torch.from_numpy(rng.random(lfwd.shape[:3]) > 0.2)
    restored = xr.Dataset({"frames": (("frame", "y", "x", "rgb"), frames)})
    cond = np.where(mask[..., None] > 0, 128, truth).astype(np.uint8)  # the holes greyed, as prepare does
    prepared = xr.Dataset({"truth": (("frame", "y", "x", "rgb"), truth), "mask": (("frame", "y", "x"), mask),
                           "cond": (("frame", "y", "x", "rgb"), cond)}, attrs={"task": "inpaint"})
    flows = xr.Dataset({"forward": (("pair", "y", "x", "xy"), fwd.float().numpy()), "valid": (("pair", "y", "x"), valid.numpy()),
                        "latent_forward": (("pair", "ly", "lx", "xy"), lfwd.float().numpy()),
                        "latent_valid": (("pair", "ly", "lx"), lvalid.numpy())})
    return restored, prepared, flows, lat.astype(np.float32)


def test_streamed_metrics_equal_the_whole_video_formulas():
    restored, prepared, flows, latents = _datasets()
    h, w = restored["frames"].shape[1:3]
    x = torch.from_numpy(restored["frames"].values).permute(0, 3, 1, 2).double() / 255
    fwd = torch.from_numpy(flows["forward"].values)[:, :h, :w]
    valid = torch.from_numpy(flows["valid"].values)[:, :h, :w]
    z = torch.from_numpy(latents).double()
    lfwd, lvalid = torch.from_numpy(flows["latent_forward"].values), torch.from_numpy(flows["latent_valid"].values)
    truth = torch.from_numpy(prepared["truth"].values[:, :h, :w]).permute(0, 3, 1, 2).double() / 255
    expected = {
        "warping_error_pixel_first": metrics.warping_error(x, fwd, valid, "first"),
        "warping_error_pixel_prev": metrics.warping_error(x, fwd, valid, "prev"),
        "warping_error_latent_first": metrics.warping_error(z, lfwd, lvalid, "first"),
        "warping_error_latent_prev": metrics.warping_error(z, lfwd, lvalid, "prev"),
        "psnr": metrics.psnr(x, truth),
        "ssim": metrics.ssim(x, truth),
    }
    hole = torch.from_numpy(prepared["mask"].values[:, :h, :w]).bool()[:, None].expand_as(x)
    hole_psnr = float(10 * torch.log10(1 / ((x - truth)[hole] ** 2).mean()))
    from ops.training import telea_inpaint

    cond = torch.from_numpy(prepared["cond"].values[:, :h, :w]).permute(0, 3, 1, 2).double() / 255
    telea = telea_inpaint(cond, hole[:, :1].double()).double()  # the input baseline of inpainting
    wholes = {"restored": x, "input": telea}
    for chunks in ({"frame": 1}, {"frame": 3}, {"frame": 2, "pair": 2}):  # lazy (dask) chunks of frames, as zarr gives
        lazy = [d.chunk({k: v for k, v in chunks.items() if k in d.dims}) for d in (restored, prepared, flows)]
        lat = xr.DataArray(latents, dims=("frame", "c", "ly", "lx")).chunk({"frame": chunks["frame"]})
        got = metrics_stage.compute_metrics(*lazy, lat)
        for name, values in expected.items():
            np.testing.assert_allclose(got["per_frame"][name], values.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
        assert np.isclose(got["summary"]["flicker"], float(metrics.flicker(x)))
        assert np.isclose(got["summary"]["hole_psnr"], hole_psnr)
        base = got["summary"]["input"]
        assert base["name"].startswith("Telea")
        for name, v in wholes.items():  # grad ratio and blockiness summed over chunks = the whole video's
            summary = got["summary"] if name == "restored" else base
            assert np.isclose(summary["grad_ratio"], metrics.grad_ratio(v, truth)), name
            assert np.isclose(summary["blockiness"], float(metrics.blockiness(v, truth))), name
        assert np.isclose(base["psnr"], float(metrics.psnr(telea, truth).mean()))
        assert np.isclose(base["warping_error"]["pixel_prev"], metrics.summarize(metrics.warping_error(telea, fwd, valid, "prev")))
        assert set(base["warping_error"]) == {"pixel_first", "pixel_prev"}  # the input has no latents
        assert base["psnr"] > got["summary"]["psnr"]  # Telea beats random frames: the baseline is not the restoration


def test_frame_chunks_follow_the_stored_chunks():
    restored, *_ = _datasets(f=7)
    lazy = restored["frames"].chunk({"frame": 3})
    starts = [s for s, _ in frame_chunks(lazy)]
    assert starts == [0, 3, 6]
    assert np.array_equal(np.stack(list(outputs.stored_frames(lazy))), restored["frames"].values)


def test_prepare_is_streamed_chunk_by_chunk_and_equals_the_whole_video(tmp_path):
    """prepare's result is lazy, one stored chunk of frames per task; stored, it equals preparing all frames at once."""
    from storage.artifacts import ArtifactStore
    from tasks import degrade as prepare
    from tests._clips import render

    frames = render(45, 37, 5)  # odd size: padded to the model's 32 px multiple
    store = ArtifactStore(str(tmp_path))
    store.write("extract_frames", "k", xr.Dataset({"frames": (("frame", "y", "x", "rgb"), frames)}))
    extracted = store.open("extract_frames", "k", chunks=False)
    for task_name, mode in (("sr8", "benchmark"), ("sr8", "restore"), ("inpaint", "benchmark")):
        ds = prepare.compute(extracted, task_name, mode, 0, None, None, 32)
        assert ds["cond"].chunks[0] == (1,) * 5  # lazy: nothing computed yet, one task per stored chunk
        whole = prepare.prepare_frames(frames, task_name, mode, 32, ds["mask"].values[:1].astype(bool) if "mask" in ds else None)
        store.write("prepare", f"{task_name}-{mode}", ds)
        back = store.open("prepare", f"{task_name}-{mode}")
        assert set(back) == set(whole)
        for name, array in whole.items():
            assert np.array_equal(back[name].values, array), (task_name, mode, name)
        assert back["cond"].shape[1] % 32 == 0 and back["cond"].shape[2] % 32 == 0


def test_super_resolution_baseline_is_back_projected_bicubic_cropped_to_the_frame():
    """The SR input baseline is bicubic xS back-projected onto the low-res input (what decode does to a restoration),
    computed on the padded grid and cropped, chunk by chunk."""
    from ops import degrade
    from tasks.metrics import input_frames

    rng = np.random.default_rng(1)
    low = (rng.random((3, 5, 6, 3)) * 255).astype(np.uint8)  # (F, h, w, 3) the padded low-res input
    prepared = xr.Dataset({"input": (("frame", "ly", "lx", "rgb"), low)}, attrs={"task": "sr8"})
    lo = torch.from_numpy(low).permute(0, 3, 1, 2).float() / 255
    expected = degrade.back_project(degrade.upsample(lo, 8), lo, 8).double()[..., :37, :45]
    got = torch.cat([input_frames(prepared, 0, 2, 37, 45), input_frames(prepared, 2, 3, 37, 45)])
    assert got.shape == (3, 3, 37, 45)
    torch.testing.assert_close(got, expected)
    assert float((degrade.downsample(degrade.back_project(degrade.upsample(lo, 8), lo, 8), 8) - lo).abs().mean()) < \
        float((degrade.downsample(degrade.upsample(lo, 8), 8) - lo).abs().mean())  # closer to its input than bicubic


def test_prepare_key_of_benchmark_with_the_users_mask_is_not_the_random_masks_one(tmp_path):
    """Before benchmark mode honoured --mask it stored the seed's random masks under a key that named the mask file:
    the user's holes get a key of their own, so such an old artifact is never served for them."""
    from tasks import degrade as prepare

    mask = tmp_path / "m.png"
    mask.write_bytes(b"png")
    args = {"task": "inpaint", "seed": 0, "multiple": 32, "mask": str(mask)}
    bench = prepare._identity({**args, "mode": "benchmark"}, {})
    restore = prepare._identity({**args, "mode": "restore"}, {})
    assert bench["holes"] == "mask" and "holes" not in restore  # restore keys (always the user's holes) unchanged
    assert "holes" not in prepare._identity({**args, "mode": "benchmark", "mask": None}, {})
