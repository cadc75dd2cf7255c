"""Device twin of `data.augment.augment_batch_2d`: the same draws, applied to the whole batch
in one affine_grid + grid_sample (nearest), rot90 + flip being affine maps too and "none" the
identity, so a device step launches a handful of kernels whatever the draws. Equal to the
per-sample augmentation (tests/test_fast_paths.py)."""
from __future__ import annotations

import torch

from buarl.data.augment import affine_sample, draw_2d, rotation_theta


def rot90_flip_theta(k: int, axis: int) -> torch.Tensor:
    """`torch.rot90(., k, (H, W))` then a flip of H (axis 0) or W (axis 1), as the affine map
    of output to input coordinates that `affine_grid` takes (x along W, y along H). On a
    square image with align_corners=False it sends pixel centres to pixel centres, so nearest
    sampling reproduces rot90 and flip exactly."""
    quarter = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # rot90 k=1: out[i, j] = in[j, N-1-i]
    flip = torch.diag(torch.tensor([1.0, -1.0] if axis == 0 else [-1.0, 1.0]))
    return torch.cat([torch.linalg.matrix_power(quarter, k) @ flip, torch.zeros(2, 1)], 1)


def draw_thetas(n: int, gen: torch.Generator) -> torch.Tensor:
    """n samples' draws (`draw_2d`, in order) as the affine maps `affine_grid` takes,
    (n, 2, 3) on the host: rot90 + flip exactly, a rotation by its angle, "none" the identity."""
    draws = [draw_2d(gen) for _ in range(n)]
    return torch.stack([rot90_flip_theta(k, axis) if kind == "rot90" else rotation_theta(degrees)
                        for kind, k, axis, degrees in draws])


# the one pass itself is the plain affine sampling, over the whole batch
sample = affine_sample


def augment_batch_2d(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    """The draws of `data.augment.augment_2d` sample by sample, applied in one pass
    (square images)."""
    return sample(images, labels, draw_thetas(len(images), gen).to(images.device))
