"""Shared data types."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Case:
    """One evaluation volume: ACDC (D, H, W) or LA (X, Y, Z); label uint8."""

    name: str
    image: np.ndarray
    label: np.ndarray
