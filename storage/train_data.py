"""Training photographs: Debian's wallpaper packages + scikit-image's photographs, split by image.

    python -m storage.train_data [--install] [--cache DIR]      (`make train-data`)

`--install` runs `apt-get install -y` for the wallpaper packages (as root). Then every photograph below is read,
resized so its shorter side is `SHORT_SIDE` px (Lanczos; the wallpapers are 2.5-15 Mpx, real video frames are far
smaller, and the downscale removes JPEG noise) and written as PNG under the cache directory with a manifest.json.

How the photographs were chosen: every image the three packages install was looked at on one contact sheet; the
camera photographs are listed below (nature, water, flowers, architecture, objects). Left out: rendered or drawn
abstract art (Plasma's Altai, Canopee, Cascade, Cluster, Elarun, Flow, FlyingKonqui, Honeywave, IceCold, Kay,
Kokkini, MilkyWay, Opal, PastelHills, Patak, SafeLanding, Shell, Volna; MATE's abstract/ and desktop/ sets; every
GNOME background), the painted `Autumn`, and logos. Split by image: TEST photographs are never trained on and
give the cards' held-out numbers, VAL ones pick nothing yet but are kept apart for tuning.
Nothing here is needed by `make demo` or `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers", "gnome-backgrounds")
SHORT_SIDE = 640
DEFAULT_CACHE = Path(os.environ.get("RESTORE_VIDEO_TRAIN_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "train-data"))

# name -> path of the camera photographs (Plasma: the largest size shipped).
_PLASMA = "/usr/share/wallpapers/{}/contents/images"
_MATE = "/usr/share/backgrounds/mate/nature/{}.jpg"
PHOTOS = {
    **{n: _PLASMA.format(n) for n in ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                                      "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am")},
    **{n: _MATE.format(n) for n in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird",
                                    "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower")},
}
TEST = ("BytheWater", "Grey", "LadyBird", "FreshFlower")
VAL = ("EveningGlow", "Blinds")
TRAIN = tuple(n for n in PHOTOS if n not in TEST + VAL)

# scikit-image photographs trained on. Held out: coffee (the demo clip's source, storage/sample.py), rocket,
# motorcycle_right (+ its stereo twin motorcycle_left); not photographs: text, page, cell, ihc, retina,
# hubble_deep_field, clock_motion.
SKIMAGE_TRAIN = ("astronaut", "brick", "camera", "chelsea", "coins", "grass", "gravel", "moon")
SKIMAGE_TEST = ("coffee", "rocket", "motorcycle_right")


def install(packages=PACKAGES) -> None:
    """apt-get update + install the wallpaper packages (root only)."""
    if os.geteuid() != 0:
        raise SystemExit(f"installing {' '.join(packages)} needs root: run `sudo make train-data`, or install them "
                         "yourself and run `python -m storage.train_data` without --install")
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages], check=True)


def source_file(name: str) -> Path:
    """The file of one listed photograph (for Plasma, the largest size of the set)."""
    p = Path(PHOTOS[name])
    if p.is_dir():
        files = sorted(p.iterdir(), key=lambda f: f.stat().st_size)
        if not files:
            raise FileNotFoundError(f"{p} is empty")
        return files[-1]
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: run `make train-data` (installs {' '.join(PACKAGES)})")
    return p


def prepare(cache: Path = DEFAULT_CACHE, short_side: int = SHORT_SIDE) -> dict:
    """Resize every listed photograph into cache/<name>.png -> the manifest {name: {file, split, size}}."""
    from PIL import Image

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in PHOTOS:
        src = source_file(name)
        split = "test" if name in TEST else "val" if name in VAL else "train"
        dst = cache / f"{name}.png"
        if not dst.exists():
            im = Image.open(src).convert("RGB")
            s = short_side / min(im.size)
            im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS)
            im.save(dst)
        with Image.open(dst) as im:
            manifest[name] = {"source": str(src), "split": split, "size": list(im.size)}
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load(split: str, cache: Path = DEFAULT_CACHE) -> dict:
    """{name: (3, H, W) float tensor in [0, 1]} of one split: wallpaper photographs (+ scikit-image ones for train/test)."""
    import torch
    from PIL import Image

    from storage.models import skimage_image

    names = {"train": TRAIN, "val": VAL, "test": TEST}[split]
    out = {}
    for n in names:
        f = Path(cache) / f"{n}.png"
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: run `make train-data` first")
        out[n] = torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    for n in {"train": SKIMAGE_TRAIN, "test": SKIMAGE_TEST}.get(split, ()):
        out[f"skimage:{n}"] = skimage_image(n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m storage.train_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--install", action="store_true", help="apt-get install the wallpaper packages first (root)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    a = p.parse_args(argv)
    if a.install:
        install()
    m = prepare(Path(a.cache))
    counts = {s: sum(1 for v in m.values() if v["split"] == s) for s in ("train", "val", "test")}
    print(json.dumps({"cache": a.cache, "photographs": counts, "skimage_train": list(SKIMAGE_TRAIN),
                      "skimage_test": list(SKIMAGE_TEST)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
