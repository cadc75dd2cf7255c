"""Per-pixel loss weight maps: the one mechanism behind URL, CRL and plain baselines.

labeled pixel:   w = 1 + lambda_url * [U > tau_l]           (URL; H = 0 when off)
unlabeled pixel: w = lambda_crl * ramp(t) * [U < tau_u]     (CRL; L = 1 when off)

Other readings (config switches): URL as a loss term of its own on H (`url_mode=term`: the
labeled weight stays 1, the loop adds the term on `url_term_region`), CRL as a soft weight
lambda_crl * ramp(t) * (1 - U) (`crl_mode=soft`), and thresholds as shares of pixels
(`region_mode=quantile`).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch


def ramp(t: int, total: int) -> float:
    """exp(-5 (1 - min(t, T)/T)^2); 1 when T = 0 (BCP does not ramp)."""
    if total <= 0:
        return 1.0
    x = 1.0 - min(t, total) / total
    return math.exp(-5.0 * x * x)


# A threshold or scale that changes during training reaches compiled code as a 0-d tensor
# (the loop's `schedule`): a Python float would be baked into the graph, one graph per value.
Scalar = Union[float, torch.Tensor]


def thresholds(u: torch.Tensor, tau: Scalar, mode: str,
               within: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The threshold per image, shaped to broadcast against u (B, ...).

    threshold mode: tau itself; quantile mode: the per-image tau-quantile of U over the pixels
    where `within` (a 0/1 map like u) is 1, all pixels when None. An image with no such pixel
    gets NaN, which no comparison passes: its region is empty.
    """
    if mode == "threshold":
        if isinstance(tau, torch.Tensor):
            return tau.to(u.dtype).reshape((1,) * u.dim())
        return torch.full((u.shape[0],) + (1,) * (u.dim() - 1), tau, dtype=u.dtype, device=u.device)
    flat = u.flatten(1).float()
    if within is not None:
        flat = flat.masked_fill(within.flatten(1) <= 0, float("nan"))
    q = torch.nanquantile(flat, tau.float() if isinstance(tau, torch.Tensor) else tau, dim=1).to(u.dtype)
    return q.view(-1, *([1] * (u.dim() - 1)))


def high_region(u: torch.Tensor, tau_l: Scalar, mode: str = "threshold",
                within: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H = [U > tau_l] as float."""
    return (u > thresholds(u, tau_l, mode, within)).float()


def low_region(u: torch.Tensor, tau_u: Scalar, mode: str = "threshold",
               within: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L = [U < tau_u] as float."""
    return (u < thresholds(u, tau_u, mode, within)).float()


def url_weights(u: torch.Tensor, enabled: bool, tau_l: float, lambda_url: float,
                mode: str = "threshold", within: Optional[torch.Tensor] = None,
                reading: str = "weight") -> torch.Tensor:
    """1 + lambda_url * H; 1 without URL and under the `term` reading (the term carries URL)."""
    if not enabled or reading == "term":
        return torch.ones_like(u)
    return 1.0 + lambda_url * high_region(u, tau_l, mode, within)


def url_term_region(u: torch.Tensor, tau_l: float, mode: str, within: torch.Tensor) -> torch.Tensor:
    """The pixels URL's own loss term trains on (`url_mode=term`): H within the labeled pixels."""
    return high_region(u, tau_l, mode, within) * within


def crl_share(u: torch.Tensor, enabled: bool, tau_u: Scalar, mode: str = "threshold",
              within: Optional[torch.Tensor] = None, reading: str = "hard") -> torch.Tensor:
    """How much of each unlabeled pixel's pseudo-label CRL keeps, in [0, 1]: L (`hard`),
    1 - U (`soft`), 1 without CRL."""
    if not enabled:
        return torch.ones_like(u)
    if reading == "soft":
        return 1.0 - u
    return low_region(u, tau_u, mode, within)


def crl_weights(u: torch.Tensor, enabled: bool, tau_u: Scalar, lambda_crl: float,
                ramp_value: Scalar, mode: str = "threshold", within: Optional[torch.Tensor] = None,
                reading: str = "hard") -> torch.Tensor:
    return lambda_crl * ramp_value * crl_share(u, enabled, tau_u, mode, within, reading)


def weight_maps(u: torch.Tensor, source: torch.Tensor, *, url: bool, crl: bool, tau_l: Scalar, tau_u: Scalar,
                lambda_url: float, lambda_crl: float, ramp_value: Scalar, mode: str = "threshold",
                url_mode: str = "weight", crl_mode: str = "hard") -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """One step's weights from U and the source map S (1 labeled, 0 unlabeled): the per-pixel
    weight (`url_weights` on S, `crl_weights` elsewhere), URL's term region
    (`url_term_region`, under url_mode=term, else None) and the dose: the share of labeled
    pixels in H (frac_high), of unlabeled pixels in L (frac_low) and the mean share of a
    pseudo-label CRL keeps (crl_share). H and L are found once (a quantile threshold is a
    sort per image)."""
    unlabeled = 1 - source
    high = high_region(u, tau_l, mode, source)
    low = low_region(u, tau_u, mode, unlabeled)
    share = low if crl and crl_mode == "hard" else crl_share(u, crl, tau_u, reading=crl_mode)
    w_lab = 1.0 + lambda_url * high if url and url_mode == "weight" else torch.ones_like(u)
    weight = source * w_lab + unlabeled * (lambda_crl * ramp_value * share)
    term = high * source if url and url_mode == "term" else None
    lab_area, unl_area = source.sum().clamp(min=1), unlabeled.sum().clamp(min=1)
    stats = {"frac_high": (high * source).sum() / lab_area, "frac_low": (low * unlabeled).sum() / unl_area,
             "crl_share": (share * unlabeled).sum() / unl_area}
    return weight, term, stats


def tau_u_at(t: int, total: int, tau_u: float, start: float | None) -> float:
    """tau_u, optionally ramped from `start` over training (UA-MT style)."""
    if start is None or total <= 0:
        return tau_u
    return start + (tau_u - start) * ramp(t, total)
