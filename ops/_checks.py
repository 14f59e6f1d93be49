"""Argument checks shared by ops: every failure is a ValueError naming the argument and what was expected."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch


def _as_array(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    return np.asarray(value)


def check_finite(name: str, value) -> None:
    """Raise if `value` holds NaN or inf (a meta tensor has shapes only: nothing to check)."""
    arr = _as_array(value)
    if isinstance(arr, torch.Tensor) and arr.device.type == "meta":
        return
    ok = bool(torch.isfinite(arr).all()) if isinstance(arr, torch.Tensor) else bool(np.isfinite(arr).all())
    if not ok:
        raise ValueError(f"{name} must be finite everywhere; it contains NaN or inf values")


def check_shape(name: str, value, expected: Iterable[int | None], hint: str = "") -> None:
    """Raise unless value.shape matches `expected` (None = any size)."""
    expected = tuple(expected)
    shape = tuple(value.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} has shape {shape}; expected {want}{' ' + hint if hint else ''}")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
