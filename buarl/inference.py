"""The protocols' volume prediction, shared by `evaluate` (dataset splits) and `predict`
(new scans): ACDC models see each slice zoomed to the training size and their label map is
zoomed back (order 0); LA models slide a window (UA-MT) and average the softmax, foreground
where its probability > 0.5, optionally the largest connected component.

Each predictor can also return the normalised entropy of the softmax it decided on, at the
volume's own size (the uncertainty BUARL's regions are cut from).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from buarl.config import Config
from buarl.data.acdc import to_size
from buarl.data.types import Case
from buarl.method.pseudo import largest_component
from buarl.method.uncertainty import entropy_map
from buarl.engine import autocast, memory_format


@torch.no_grad()
def predict_acdc(model: nn.Module, image: np.ndarray, cfg: Config, device: torch.device,
                 uncertainty: bool = False):
    """image (D, H, W) or (C, D, H, W) -> labels (D, H, W) uint8 [, entropy (D, H, W) float32]."""
    volume = image if image.ndim == 4 else image[None]
    x = torch.from_numpy(to_size(volume, cfg.image_size)).transpose(0, 1).contiguous().to(device)
    x = x.contiguous(memory_format=memory_format(cfg, 2))
    with autocast(cfg, device):
        logits = model(x)
    pred = logits.argmax(1).cpu().numpy().astype(np.uint8)
    h, w = image.shape[-2:]
    labels = np.stack([ndimage.zoom(p, (h / p.shape[0], w / p.shape[1]), order=0) for p in pred])
    if not uncertainty:
        return labels
    u = entropy_map(torch.softmax(logits.float(), 1)).cpu().numpy()
    u = np.stack([ndimage.zoom(s, (h / s.shape[0], w / s.shape[1]), order=1) for s in u])
    return labels, np.clip(u, 0.0, 1.0).astype(np.float32)


def _windows(size: int, patch: int, stride: int) -> list[int]:
    n = max(1, math.ceil((size - patch) / stride) + 1)
    return sorted({min(stride * i, size - patch) for i in range(n)})


@torch.no_grad()
def predict_la(model: nn.Module, image: np.ndarray, cfg: Config, device: torch.device,
               batch: int = 4, uncertainty: bool = False):
    """UA-MT sliding window: average softmax over windows, foreground probability > 0.5;
    image (X, Y, Z) or (C, X, Y, Z)."""
    patch = cfg.patch_size
    volume = image if image.ndim == 4 else image[None]
    pad = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(volume.shape[1:], patch)]
    padded = np.pad(volume, [(0, 0)] + pad)
    shape = padded.shape[1:]
    score = np.zeros((2,) + shape, np.float32)
    count = np.zeros(shape, np.float32)
    starts = [(x, y, z) for x in _windows(shape[0], patch[0], cfg.la_stride_xy)
              for y in _windows(shape[1], patch[1], cfg.la_stride_xy)
              for z in _windows(shape[2], patch[2], cfg.la_stride_z)]
    for i in range(0, len(starts), batch):
        chunk = starts[i:i + batch]
        sl = [tuple(slice(a, a + p) for a, p in zip(s, patch)) for s in chunk]
        x = torch.from_numpy(np.stack([padded[(slice(None),) + s] for s in sl])).to(device)
        x = x.contiguous(memory_format=memory_format(cfg, 3))
        with autocast(cfg, device):
            probs = torch.softmax(model(x).float(), 1).cpu().numpy()
        for s, p in zip(sl, probs):
            score[(slice(None),) + s] += p
            count[s] += 1
    crop = tuple(slice(a, shape[k] - b) for k, (a, b) in enumerate(pad))
    mean = score[(slice(None),) + crop] / count[crop]
    pred = (mean[1] > 0.5).astype(np.uint8)
    if cfg.la_lcc:
        pred = largest_component(pred)
    if not uncertainty:
        return pred
    return pred, entropy_map(torch.from_numpy(mean)[None])[0].numpy().astype(np.float32)


def predict_volume(model: nn.Module, image: np.ndarray, cfg: Config, device: torch.device,
                   uncertainty: bool = False):
    fn = predict_acdc if cfg.dataset == "acdc" else predict_la
    return fn(model, image, cfg, device, uncertainty=uncertainty)


def predict(model: nn.Module, case: Case, cfg: Config, device: torch.device) -> np.ndarray:
    return predict_volume(model, case.image, cfg, device)
