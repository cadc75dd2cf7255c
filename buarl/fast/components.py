"""Device twin of `method.pseudo.keep_largest`: the largest connected component of each
foreground class of each label map, found on the labels' own device by label propagation
(no round trip to the host). Equal to the scipy version (tests/test_fast_paths.py)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


# Sweeps per call between two tests for the fixed point: each call costs the host a compiled
# graph's call and a test, while idle sweeps cost a GPU little. With hooking (`_sweep`) a
# batch usually reaches it within one call (bench/components.py counts the sweeps).
SWEEPS_PER_CHECK = 8


def _min_neighbour(ids: torch.Tensor, connectivity: str) -> torch.Tensor:
    """The smallest id among each voxel and its neighbours; ids (N, 1, *spatial)."""
    spatial = ids.dim() - 2
    if connectivity == "full":
        pool = F.max_pool2d if spatial == 2 else F.max_pool3d
        return -pool(-ids, 3, 1, 1)  # max pooling pads with -inf: the border never wins
    out = ids
    for axis in range(2, ids.dim()):
        n = ids.shape[axis]
        big = torch.full_like(ids.narrow(axis, 0, 1), float("inf"))
        out = torch.minimum(out, torch.cat([ids.narrow(axis, 1, n - 1), big], axis))
        out = torch.minimum(out, torch.cat([big, ids.narrow(axis, 0, n - 1)], axis))
    return out


def _sweep(ids: torch.Tensor, inside: torch.Tensor, fg: torch.Tensor, connectivity: str) -> torch.Tensor:
    """One step towards the fixed point, where each voxel holds its component's smallest
    raster index. Ids are always raster indices of voxels of the same component, never above
    a voxel's own index, and only fall:
    - spread: each voxel takes the smallest id among its neighbours inside the mask (`low`);
    - hook: a voxel whose neighbours hold a smaller id than its own passes that id to the voxel
      its own id names (a scatter of minima), so a whole tree of voxels that point there joins
      the smaller one in this sweep. Spreading alone moves an id about one voxel per sweep,
      so a large component would take as many sweeps as it is long;
    - jump: each voxel takes the id held by the voxel its id names (pointer jumping).
    Only voxels at a border between two ids scatter, so few write to the same place."""
    low = torch.where(inside, _min_neighbour(ids, connectivity), float("inf")).flatten()
    flat = ids.flatten()
    own = torch.arange(flat.numel(), device=flat.device, dtype=flat.dtype)
    hooked = low.scatter_reduce(0, torch.where(fg & (low < flat), flat, own).long(), low, "amin")
    new = torch.where(fg, torch.minimum(low, hooked[torch.where(fg, low, 0).long()]), low)
    return torch.where(fg, new[torch.where(fg, new, 0).long()], new).reshape(ids.shape)


def _sweeps(ids: torch.Tensor, inside: torch.Tensor, fg: torch.Tensor,
            connectivity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The work between two fixed-point tests: SWEEPS_PER_CHECK sweeps; returns the ids and
    whether the last sweep changed nothing (a tensor: compiled, the test is in the graph)."""
    for _ in range(SWEEPS_PER_CHECK - 1):
        ids = _sweep(ids, inside, fg, connectivity)
    last = _sweep(ids, inside, fg, connectivity)
    return last, (last == ids).all()


def _fixed_point(ids: torch.Tensor, masks: torch.Tensor, connectivity: str, sweeps) -> torch.Tensor:
    """Sweeps until one changes nothing, testing after each call of `sweeps` (its last
    sweep). A sweep that changes nothing reached the fixed point, and further sweeps keep
    it. On a GPU a test is a host sync, after which the card would idle until the host had
    launched the next sweeps. So the test's answer goes to the host behind an event, the
    next call is queued, and only then does the host wait: for the answer, not for the
    queued sweeps, and the card always has work. The price: one call of idle sweeps."""
    answered = torch.cuda.Event() if ids.is_cuda else None
    inside, fg = masks[:, None], masks.flatten()
    ids, stable = sweeps(ids, inside, fg, connectivity)
    while True:
        same = stable.to("cpu", non_blocking=True)
        if answered is not None:
            answered.record()
        queued = sweeps(ids, inside, fg, connectivity)
        if answered is not None:
            answered.synchronize()
        if same:
            return ids
        ids, stable = queued


def _keep_largest(ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """From the fixed point's ids (each voxel its component's smallest raster index) to the
    largest component per mask, ties to the first in raster order. The sizes are counted with
    scatter_add, which needs no host sync; bincount over a boolean index needs two (the
    index's length and bincount's are both read on the host)."""
    n, size = masks.shape[0], masks.numel()
    flat_masks = masks.reshape(n, -1)
    # background voxels (id inf, whose conversion is undefined) go to an extra bin, `size`
    flat_ids = torch.where(flat_masks, ids.reshape(n, -1).long(), size)
    counts = torch.zeros(size + 1, dtype=torch.long, device=masks.device)
    counts.scatter_add_(0, flat_ids.flatten(), torch.ones_like(flat_ids.flatten()))
    voxel_size = torch.where(flat_masks, counts[flat_ids], 0)
    biggest = voxel_size.amax(1, keepdim=True)
    candidates = torch.where((voxel_size == biggest) & (biggest > 0), flat_ids, size)
    keep = candidates.amin(1, keepdim=True)
    return ((flat_ids == keep) & flat_masks).reshape(masks.shape)


def _initial_ids(masks: torch.Tensor) -> torch.Tensor:
    """Each mask voxel's raster index, inf elsewhere; (N, 1, *spatial). Float ids, since
    pooling needs floats: exact up to 2**24 in float32, beyond in float64."""
    dtype = torch.float32 if masks.numel() < 2 ** 24 else torch.float64
    index = torch.arange(masks.numel(), device=masks.device, dtype=dtype).reshape(masks.shape)
    return torch.where(masks, index, float("inf"))[:, None]


def _class_masks_and_ids(labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, ...) -> a mask per image and foreground class (B * (classes - 1), ...),
    image-major, and their initial ids."""
    masks = torch.stack([labels == c for c in range(1, classes)], 1).flatten(0, 1)
    return masks, _initial_ids(masks)


def _labels_of_largest(ids: torch.Tensor, masks: torch.Tensor, classes: int) -> torch.Tensor:
    """The fixed point's ids of `_class_masks_and_ids`' masks -> labels (B, ...), each class
    its largest component."""
    keep = _keep_largest(ids[:, 0], masks).reshape((-1, classes - 1) + masks.shape[1:])
    cls = torch.arange(1, classes, device=masks.device).reshape((1, -1) + (1,) * (masks.dim() - 1))
    return (keep * cls).sum(1)


class KeepLargest:
    """labels (B, ...) -> labels with each foreground class reduced to its largest component.
    Every voxel starts with its raster index as id; ids spread as the minimum over neighbours
    inside the class mask, hook trees onto smaller ids and jump along their ids (`_sweep`)
    until nothing changes (`_fixed_point`). The fixed point is unique (each voxel holds its
    component's smallest raster index, however the sweeps are grouped or compiled), so ties go
    to the first component in raster order, as in the scipy version. `graph` turns the start,
    the sweeps and the finish into compiled graphs (the engine's; identity when eager)."""

    def __init__(self, classes: int, connectivity: str = "full", graph: Callable = lambda fn: fn):
        self.classes, self.connectivity = classes, connectivity
        self.start, self.sweeps, self.finish = graph(_class_masks_and_ids), graph(_sweeps), graph(_labels_of_largest)

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        masks, ids = self.start(labels, self.classes)
        return self.finish(_fixed_point(ids, masks, self.connectivity, self.sweeps), masks, self.classes)
