"""Teacher pseudo-labels: argmax, optionally cleaned to the largest component per class (BCP)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from buarl.runtime import graph_of


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


# Sweeps per call between two tests for the fixed point: each call costs the host a compiled
# graph's call and a test, while idle sweeps cost a GPU little (BENCHMARKS.md, G1). The
# sweeps reach it in 5 to 7 (`_sweep`), so a batch usually takes one call and the one queued
# behind its test.
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
      the smaller one in this sweep. Spreading alone moves an id about one voxel per sweep:
      21 sweeps on average for a batch of ACDC's label maps (up to 36), 41 for LA's, 163 for
      blobby maps like an early teacher's; with hooking 5 to 7 (`bench/components.py`);
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


def largest_components_torch(masks: torch.Tensor, connectivity: str = "full", compiled: bool = False) -> torch.Tensor:
    """`largest_components` on the masks' own device (a GPU keeps the pseudo-labels there):
    every voxel starts with its raster index as id; ids spread as the minimum over
    neighbours inside the mask, hook trees onto smaller ids and jump along their ids
    (`_sweep`) until nothing changes
    (`_fixed_point`). The fixed point is unique (each voxel holds its component's smallest
    raster index, however the sweeps are grouped or compiled), so ties go to the first
    component in raster order, as in the scipy path. masks (N, *spatial) bool; `compiled`:
    the start, the sweeps and the counting through torch.compile."""
    start, sweeps, keep_largest = _stages(_initial_ids, _keep_largest, compiled)
    ids = _fixed_point(start(masks), masks, connectivity, sweeps)
    return keep_largest(ids[:, 0], masks)


def _stages(start, finish, compiled: bool):
    """A clean-up's start, sweeps and finish: each one graph in a compiled run, else eager.
    Eager, each sweep is several small kernels the host launches and each test of the fixed
    point two more; compiled, a few per sweep (the scatter of minima stays ATen's kernel:
    inductor has no lowering for it) and the test inside the sweeps' graph."""
    if compiled:
        return graph_of(start), graph_of(_sweeps), graph_of(finish)
    return start, _sweeps, finish


def pseudo_labels(probs: torch.Tensor, lcc: bool, connectivity: str = "full", compiled: bool = False) -> torch.Tensor:
    """probs (B, C, ...) -> labels (B, ...); with lcc, each foreground class of each image
    keeps only its largest connected component (the rest becomes background). On a CPU
    scipy labels the components; elsewhere they are found on the device (no round trip),
    with `compiled` sweeps in a run that compiles its network."""
    labels = probs.argmax(1)
    if not lcc:
        return labels
    if labels.device.type == "cpu":
        return keep_largest_scipy(labels, probs.shape[1], connectivity)
    return keep_largest_torch(labels, probs.shape[1], connectivity, compiled)


def keep_largest_torch(labels: torch.Tensor, classes: int, connectivity: str, compiled: bool = False) -> torch.Tensor:
    start, sweeps, finish = _stages(_class_masks_and_ids, _labels_of_largest, compiled)
    masks, ids = start(labels, classes)
    return finish(_fixed_point(ids, masks, connectivity, sweeps), masks, classes)


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


def keep_largest_scipy(labels: torch.Tensor, classes: int, connectivity: str) -> torch.Tensor:
    arr = labels.cpu().numpy()
    masks = np.stack([arr == c for c in range(1, classes)], axis=1)  # (B, C-1, ...)
    keep = largest_components(masks.reshape((-1,) + arr.shape[1:]), connectivity).reshape(masks.shape)
    out = np.zeros_like(arr)
    for c in range(1, classes):
        out[keep[:, c - 1]] = c
    return torch.from_numpy(out).to(labels.device)
