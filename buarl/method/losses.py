"""(weighted CE + weighted soft Dice) / 2 over two source regions, as BCP's mix loss.

Every image handed to the loss carries a source map S: 1 where a pixel comes from a
labeled image (target = ground truth), 0 where it comes from an unlabeled one (target =
teacher pseudo-label). Each region r in {S, 1-S} contributes
    CE_r   = sum(w * ce * R) / sum(R)                        (area-normalised)
    Dice_r = (sum(w * R) / sum(R)) * DiceLoss(p, y, mask = w * R)
so a constant weight scales both terms alike (BCP's u_weight), while a varying weight
moves emphasis between pixels inside the region (URL, CRL).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1e-10  # BCP's ACDC DiceLoss smoothing (config key `dice_smooth`)


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   smooth: float = SMOOTH, form: str = "squared") -> torch.Tensor:
    """1 - Dice with a pixel mask, averaged over all classes (background included).
    `squared`: BCP's ACDC DiceLoss, per class over the whole batch, p^2 + y^2 below.
    `linear`: BCP's LA mask_DiceLoss, per image and class, p + y below, then the mean."""
    c = probs.shape[1]
    onehot = F.one_hot(target, c).movedim(-1, 1).to(probs.dtype)
    m = mask.unsqueeze(1)
    if form == "linear":
        dims = list(range(2, probs.dim()))
        inter = (probs * onehot * m).sum(dims)
        union = ((probs + onehot) * m).sum(dims)
        return (1 - (2 * inter + smooth) / (union + smooth)).mean()
    dims = [0] + list(range(2, probs.dim()))
    inter = (probs * onehot * m).sum(dims)
    y = (onehot * onehot * m).sum(dims)
    z = (probs * probs * m).sum(dims)
    return (1 - (2 * inter + smooth) / (z + y + smooth)).mean()


def region_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                source: torch.Tensor, smooth: float = SMOOTH, form: str = "squared",
                parts: int = 1) -> torch.Tensor:
    """logits (B, C, ...), target (B, ...) long, weight and source (B, ...) float. `parts`:
    the batch is that many batches side by side, each its own loss, summed (BCP's two mixed
    batches, each its own mix loss; one call, so one compiled graph for both)."""
    if parts > 1:
        chunks = zip(*(v.chunk(parts) for v in (logits, target, weight, source)))
        return sum(region_loss(l, t, w, s, smooth, form) for l, t, w, s in chunks)
    logits = logits.float()
    probs = torch.softmax(logits, 1)
    ce = F.cross_entropy(logits, target, reduction="none")
    total = logits.new_zeros(())
    for region in (source, 1.0 - source):
        # An empty region contributes exactly 0 (its weights are 0); clamping instead of
        # branching keeps the step free of host syncs on GPUs.
        area = region.sum().clamp(min=1.0)
        m = weight * region
        ce_r = (m * ce).sum() / area
        dice_r = (m.sum() / area) * soft_dice_loss(probs, target, m, smooth, form)
        total = total + (ce_r + dice_r) / 2
    return total


def term_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor,
              smooth: float = SMOOTH, form: str = "squared", parts: int = 1) -> torch.Tensor:
    """(CE + Dice) / 2 over `region` alone, a loss term of its own (URL's `term` reading):
    CE = sum(ce * R) / sum(R), Dice with mask R; an empty region gives exactly 0. `parts`: as
    in region_loss, each batch side by side its own term, summed."""
    if parts > 1:
        return sum(term_loss(l, t, r, smooth, form) for l, t, r in zip(*(v.chunk(parts) for v in (logits, target, region))))
    logits = logits.float()
    ce = F.cross_entropy(logits, target, reduction="none")
    ce_r = (region * ce).sum() / region.sum().clamp(min=1.0)
    return (ce_r + soft_dice_loss(torch.softmax(logits, 1), target, region, smooth, form)) / 2


def mse_consistency(logits: torch.Tensor, target_probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SSL4MIS's mean-teacher consistency: squared softmax difference, averaged over classes,
    weighted per pixel and normalised by the pixel count (as `region_loss` normalises by area),
    so a constant weight w gives w * mean((p_s - p_t)^2)."""
    per_pixel = ((torch.softmax(logits.float(), 1) - target_probs.float()) ** 2).mean(1)
    return (weight * per_pixel).sum() / per_pixel.numel()
