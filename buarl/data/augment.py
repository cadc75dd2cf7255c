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


def rotation_theta(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])


def _rotate(image: torch.Tensor, label: torch.Tensor, degrees: float):
    c = image.shape[0]
    theta = rotation_theta(degrees)
    stacked = torch.cat([image, label[None].float()], 0)[None]  # (1, C + 1, H, W)
    grid = F.affine_grid(theta[None], list(stacked.shape), align_corners=False)
    out = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    return out[:c], out[c].round().long()


def draw_2d(gen: torch.Generator) -> tuple[str, int, int, float]:
    """One sample's augmentation: ("rot90", k, flip axis, 0), ("rotate", 0, 0, degrees) or
    ("none", 0, 0, 0). Drawing is separate from applying so that a batch can be drawn
    sample by sample (the same stream as one-at-a-time) and applied in a few batched ops."""
    if _u(gen) > 0.5:
        k = int(torch.randint(0, 4, (), generator=gen))
        axis = int(torch.randint(0, 2, (), generator=gen))
        return "rot90", k, axis, 0.0
    if _u(gen) > 0.5:
        return "rotate", 0, 0, -20.0 + 40.0 * _u(gen)
    return "none", 0, 0, 0.0


def augment_2d(image: torch.Tensor, label: torch.Tensor, gen: torch.Generator):
    """image (C, H, W), label (H, W) -> augmented pair of the same shapes."""
    kind, k, axis, degrees = draw_2d(gen)
    if kind == "rot90":
        image, label = torch.rot90(image, k, (1, 2)), torch.rot90(label, k, (0, 1))
        image, label = torch.flip(image, (axis + 1,)), torch.flip(label, (axis,))
    elif kind == "rotate":
        image, label = _rotate(image, label, degrees)
    return image.contiguous(), label.contiguous()


def affine_sample(images: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor):
    """images (B, C, H, W) and labels (B, H, W) through one affine_grid + grid_sample
    (nearest) with each sample's theta (B, 2, 3), on the images' device."""
    c = images.shape[1]
    stacked = torch.cat([images, labels[:, None].to(images.dtype)], 1)
    grid = F.affine_grid(theta, list(stacked.shape), align_corners=False)
    out = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out[:, :c].contiguous(), out[:, c].round().to(labels.dtype)


def augment_batch_2d(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    """images (B, C, H, W), labels (B, H, W): the draws of `augment_2d` sample by sample,
    applied in a few batched ops: one rot90 + flip per (k, axis) group and one grid_sample for
    the rotated samples (equal to `augment_2d` per sample; a device uses the one-pass twin in
    fast/augment.py)."""
    if images.shape[-1] != images.shape[-2]:
        pairs = [augment_2d(i, l, gen) for i, l in zip(images, labels)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    draws = [draw_2d(gen) for _ in range(len(images))]
    images, labels = images.clone(), labels.clone()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (kind, k, axis, _) in enumerate(draws):
        if kind == "rot90":
            groups.setdefault((k, axis), []).append(i)
    for (k, axis), members in groups.items():
        images[members] = torch.flip(torch.rot90(images[members], k, (2, 3)), (axis + 2,))
        labels[members] = torch.flip(torch.rot90(labels[members], k, (1, 2)), (axis + 1,))
    rotated = [i for i, d in enumerate(draws) if d[0] == "rotate"]
    if rotated:
        theta = torch.stack([rotation_theta(draws[i][3]) for i in rotated]).to(images.device)
        images[rotated], labels[rotated] = affine_sample(images[rotated], labels[rotated], theta)
    return images, labels


def random_crop_3d(image: np.ndarray, label: np.ndarray, patch: list[int], gen: torch.Generator):
    """Crop (and zero-pad where the scan is smaller) to the patch, as UA-MT's RandomCrop;
    image (X, Y, Z) or (C, X, Y, Z), label (X, Y, Z)."""
    pad = [(max(0, p - s) // 2 + 1, max(0, p - s) // 2 + 1) if s <= p else (0, 0)
           for s, p in zip(label.shape, patch)]
    channel = [(0, 0)] * (image.ndim - 3)
    if any(sum(p) for p in pad):
        image, label = np.pad(image, channel + pad), np.pad(label, pad)
    starts = [int(torch.randint(0, s - p + 1, (), generator=gen)) for s, p in zip(label.shape, patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, patch))
    return image[(...,) + sl], label[sl]


def augment_3d(image: torch.Tensor, label: torch.Tensor, gen: torch.Generator):
    """image (C, X, Y, Z), label (X, Y, Z): rot90 in the axial plane and a random flip."""
    if image.shape[1] == image.shape[2]:
        k = int(torch.randint(0, 4, (), generator=gen))
        image, label = torch.rot90(image, k, (1, 2)), torch.rot90(label, k, (0, 1))
    axis = int(torch.randint(0, 3, (), generator=gen))
    image, label = torch.flip(image, (axis + 1,)), torch.flip(label, (axis,))
    return image.contiguous(), label.contiguous()
