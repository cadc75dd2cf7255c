"""A PNG grid per run: image / label / prediction / uncertainty / URL and CRL regions.

Rows are a few validation slices (ACDC: the middle slice of a volume; LA: the middle
axial slice of a centre patch). The regions are those the method would use at the run's
thresholds: URL = U > tau_l (extra supervised weight), CRL = U < tau_u (pseudo-labels kept).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from buarl.config import Config
from buarl.data.acdc import to_size
from buarl.data.types import Case
from buarl.method.uncertainty import entropy_map
from buarl.method.weights import high_region, low_region
from buarl.engine import autocast


def _views(case: Case, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The middle slice (ACDC) or the central patch (LA): image (C, ...) and label."""
    image = case.image if case.image.ndim > case.label.ndim else case.image[None]
    if cfg.dataset == "acdc":
        z = case.label.shape[0] // 2
        return to_size(image[:, z], cfg.image_size), to_size(case.label[z], cfg.image_size)
    starts = [max(0, (s - p) // 2) for s, p in zip(case.label.shape, cfg.patch_size)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, cfg.patch_size))
    return image[(slice(None),) + sl], case.label[sl]


@torch.no_grad()
def region_grid(model: nn.Module, cases: list[Case], cfg: Config, device: torch.device, path: Path,
                rows: int = 4) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = cases[:rows]
    was = model.training
    model.eval()
    titles = ["image", "label", "prediction", "uncertainty U", f"URL: U > {cfg.tau_l:.2f}",
              f"CRL: U < {cfg.tau_u:.2f}"]
    fig, axes = plt.subplots(len(cases), 6, figsize=(12, 2.1 * len(cases)), squeeze=False)
    for r, case in enumerate(cases):
        image, label = _views(case, cfg)
        x = torch.from_numpy(np.ascontiguousarray(image))[None].float().to(device)
        with autocast(cfg, device):
            probs = torch.softmax(model(x).float(), 1)
        u = entropy_map(probs)
        pred = probs.argmax(1)
        panels = [image[0], label, pred[0].cpu().numpy(), u[0].cpu().numpy(),
                  high_region(u, cfg.tau_l, cfg.region_mode)[0].cpu().numpy(),
                  low_region(u, cfg.tau_u, cfg.region_mode)[0].cpu().numpy()]
        if cfg.dataset == "la":
            z = image.shape[-1] // 2
            panels = [p[..., z] for p in panels]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            cmap, vmax = ("gray", None) if c == 0 else ("viridis", cfg.num_classes - 1) if c in (1, 2) else ("magma", 1)
            ax.imshow(panel, cmap=cmap, vmin=0 if c else None, vmax=vmax, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[r][0].set_ylabel(case.name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    model.train(was)
    return Path(path)
