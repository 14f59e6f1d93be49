"""Frames between storage and the networks: uint8 (F, H, W, 3) in [0, 255] <-> float (F, 3, H, W) in [0, 1]."""

from __future__ import annotations

import numpy as np
import torch


def to_float(frames: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> float images (F, 3, H, W) in [0, 1] of `dtype`."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(dtype) / 255.0  # (F, 3, H, W)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float images (F, 3, H, W), clamped to [0, 1] -> uint8 frames (F, H, W, 3), rounded to nearest."""
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (F, H, W, 3)
