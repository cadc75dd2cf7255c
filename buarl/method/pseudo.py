"""Teacher pseudo-labels: argmax, optionally cleaned to the largest component per class (BCP)."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of a binary mask (any dimension)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, range(1, n + 1))
    return (labels == 1 + int(np.argmax(sizes))).astype(mask.dtype)


def pseudo_labels(probs: torch.Tensor, lcc: bool) -> torch.Tensor:
    """probs (B, C, ...) -> labels (B, ...); with lcc, each foreground class of each image
    keeps only its largest connected component (the rest becomes background)."""
    labels = probs.argmax(1)
    if not lcc:
        return labels
    arr = labels.cpu().numpy()
    out = np.zeros_like(arr)
    for b in range(arr.shape[0]):
        for c in range(1, probs.shape[1]):
            out[b][largest_component(arr[b] == c)] = c
    return torch.from_numpy(out).to(labels.device)
