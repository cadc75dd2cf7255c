"""Training augmentations of the protocol, on tensors, driven by one torch.Generator.

2-D (SSL4MIS RandomGenerator): with p=1/2 a random rot90 + flip, else with p=1/2 a
rotation in [-20, 20) degrees (nearest neighbour, as the reference's order=0).
3-D (UA-MT): random crop to the patch, then random rot90 in the axial plane and a flip.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _u(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _rotate(image: torch.Tensor, label: torch.Tensor, degrees: float):
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    stacked = torch.cat([image, label[None].float()], 0)[None]  # (1, 2, H, W)
    grid = F.affine_grid(theta[None], list(stacked.shape), align_corners=False)
    out = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    return out[:1], out[1].round().long()


def augment_2d(image: torch.Tensor, label: torch.Tensor, gen: torch.Generator):
    """image (1, H, W), label (H, W) -> augmented pair of the same shapes."""
    if _u(gen) > 0.5:
        k = int(torch.randint(0, 4, (), generator=gen))
        image, label = torch.rot90(image, k, (1, 2)), torch.rot90(label, k, (0, 1))
        axis = int(torch.randint(0, 2, (), generator=gen))
        image, label = torch.flip(image, (axis + 1,)), torch.flip(label, (axis,))
    elif _u(gen) > 0.5:
        image, label = _rotate(image, label, -20.0 + 40.0 * _u(gen))
    return image.contiguous(), label.contiguous()


def random_crop_3d(image: np.ndarray, label: np.ndarray, patch: list[int], gen: torch.Generator):
    """Crop (and zero-pad where the scan is smaller) to the patch, as UA-MT's RandomCrop."""
    pad = [(max(0, p - s) // 2 + 1, max(0, p - s) // 2 + 1) if s <= p else (0, 0)
           for s, p in zip(image.shape, patch)]
    if any(sum(p) for p in pad):
        image, label = np.pad(image, pad), np.pad(label, pad)
    starts = [int(torch.randint(0, s - p + 1, (), generator=gen)) for s, p in zip(image.shape, patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, patch))
    return image[sl], label[sl]


def augment_3d(image: torch.Tensor, label: torch.Tensor, gen: torch.Generator):
    """image (1, X, Y, Z), label (X, Y, Z): rot90 in the axial plane and a random flip."""
    if image.shape[1] == image.shape[2]:
        k = int(torch.randint(0, 4, (), generator=gen))
        image, label = torch.rot90(image, k, (1, 2)), torch.rot90(label, k, (0, 1))
    axis = int(torch.randint(0, 3, (), generator=gen))
    image, label = torch.flip(image, (axis + 1,)), torch.flip(label, (axis,))
    return image.contiguous(), label.contiguous()
