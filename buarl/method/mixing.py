"""Bidirectional copy-paste (BCP): one box mask mixes images, targets, weights and maps."""
from __future__ import annotations

import torch


def box_mask(shape: tuple[int, ...], ratio: float, gen: torch.Generator,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """1 everywhere except a zero box of `ratio` of each side at a random place (BCP).

    shape is the spatial shape (H, W) or (X, Y, Z); the 3-D box spans ratio of each axis.
    The place is drawn from `gen` (a CPU generator); the mask is made on `device`.
    """
    mask = torch.ones(shape, device=device)
    sl = []
    for s in shape:
        size = int(s * ratio)
        start = int(torch.randint(0, s - size + 1, (), generator=gen))
        sl.append(slice(start, start + size))
    mask[tuple(sl)] = 0
    return mask


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a where mask is 1, b inside the box; the spatial mask broadcasts over batch and
    channel dimensions."""
    m = mask.to(a.dtype)
    while m.dim() < a.dim():
        m = m.unsqueeze(0)
    return a * m + b * (1 - m)
