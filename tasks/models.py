"""Model loading shared by the stages: one instance per (name, device) per process."""

from __future__ import annotations

import threading
from functools import lru_cache

_LOAD_LOCK = threading.Lock()


def get_model(name: str, device: str = "cpu"):
    """The loaded model, once per process even when several threads (restore-archive) ask at once.

    The lock also keeps diffusers' lazy module imports single-threaded: two threads importing
    `diffusers.UNet2DModel` at the same moment can see a half-initialised module (ImportError).
    """
    with _LOAD_LOCK:
        return _load(name, device)


@lru_cache(maxsize=4)
def _load(name: str, device: str):
    from storage.models import load_model

    model = load_model(name, device=device)
    for p in model.parameters() if hasattr(model, "parameters") else []:
        p.requires_grad_(False)
    return model


def model_identity(name: str) -> dict:
    """What identifies a model's weights in cache keys: its id and card (weights hash where known)."""
    model = get_model(name)
    card = getattr(model, "card", {}) or {}
    return {"model_id": getattr(model, "model_id", name), "weights": card.get("weights_sha256") or card.get("git_commit") or card.get("steps")}
