"""Shared data types."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Case:
    """One volume: image ACDC (D, H, W) or LA (X, Y, Z), with a leading channel axis
    (C, ...) when a prepared dataset has several channels; label (spatial axes) uint8."""

    name: str
    image: np.ndarray
    label: np.ndarray
