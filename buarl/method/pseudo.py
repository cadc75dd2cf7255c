"""Teacher pseudo-labels: argmax, optionally cleaned to the largest component per class (BCP)."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def _structure(ndim: int, connectivity: str) -> np.ndarray:
    """`full` counts diagonal neighbours (8 in 2-D, 26 in 3-D): skimage.measure.label's
    default, which BCP's and UA-MT's clean-ups use; `face` is scipy's default (4 / 6)."""
    return ndimage.generate_binary_structure(ndim, ndim if connectivity == "full" else 1)


def largest_component(mask: np.ndarray, connectivity: str = "full") -> np.ndarray:
    """Keep the largest connected component of a binary mask (any dimension)."""
    return largest_components(mask[None], connectivity)[0].astype(mask.dtype)


def largest_components(masks: np.ndarray, connectivity: str = "full") -> np.ndarray:
    """The largest connected component of each mask of a stack (N, ...), in one labelling
    pass: the structure never connects neighbouring masks, and scipy numbers components in
    raster order, so mask i owns a contiguous block of ids and ties go to the first
    component, as BCP's argmax over its per-image bincount."""
    spatial = _structure(masks.ndim - 1, connectivity)
    structure = np.zeros((3,) + spatial.shape, bool)
    structure[1] = spatial
    ids, _ = ndimage.label(masks, structure)
    flat = ids.reshape(len(ids), -1)
    sizes = np.bincount(flat.ravel())
    sizes[0] = 0
    last = flat.max(1)
    first = np.concatenate([[1], np.maximum.accumulate(last)[:-1] + 1])
    keep = np.zeros(len(ids), np.int64)  # 0: an empty mask stays empty
    for i in np.flatnonzero(last):
        keep[i] = first[i] + int(np.argmax(sizes[first[i]:last[i] + 1]))
    return (ids == keep.reshape((-1,) + (1,) * (ids.ndim - 1))) & (ids > 0)


def keep_largest(labels: torch.Tensor, classes: int, connectivity: str = "full") -> torch.Tensor:
    """labels (B, ...) -> each foreground class of each map reduced to its largest connected
    component (the rest becomes background), on the host."""
    arr = labels.cpu().numpy()
    masks = np.stack([arr == c for c in range(1, classes)], axis=1)  # (B, C-1, ...)
    keep = largest_components(masks.reshape((-1,) + arr.shape[1:]), connectivity).reshape(masks.shape)
    out = np.zeros_like(arr)
    for c in range(1, classes):
        out[keep[:, c - 1]] = c
    return torch.from_numpy(out).to(labels.device)


def pseudo_labels(probs: torch.Tensor, lcc: bool, connectivity: str = "full") -> torch.Tensor:
    """probs (B, C, ...) -> labels (B, ...); with lcc, each foreground class of each image
    keeps only its largest connected component."""
    labels = probs.argmax(1)
    return keep_largest(labels, probs.shape[1], connectivity) if lcc else labels
