"""Teacher pseudo-labels: argmax, optionally cleaned to the largest component per class (BCP)."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def largest_component(mask: np.ndarray, connectivity: str = "full") -> np.ndarray:
    """Keep the largest connected component of a binary mask (any dimension).

    `full` counts diagonal neighbours (8 in 2-D, 26 in 3-D): skimage.measure.label's
    default, which BCP's and UA-MT's clean-ups use; `face` is scipy's default (4 / 6)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if connectivity == "full" else 1)
    labels, n = ndimage.label(mask, structure)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, range(1, n + 1))
    return (labels == 1 + int(np.argmax(sizes))).astype(mask.dtype)


def pseudo_labels(probs: torch.Tensor, lcc: bool, connectivity: str = "full") -> torch.Tensor:
    """probs (B, C, ...) -> labels (B, ...); with lcc, each foreground class of each image
    keeps only its largest connected component (the rest becomes background)."""
    labels = probs.argmax(1)
    if not lcc:
        return labels
    arr = labels.cpu().numpy()
    out = np.zeros_like(arr)
    for b in range(arr.shape[0]):
        for c in range(1, probs.shape[1]):
            out[b][largest_component(arr[b] == c, connectivity)] = c
    return torch.from_numpy(out).to(labels.device)
