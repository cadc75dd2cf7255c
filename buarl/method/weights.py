"""Per-pixel loss weight maps: the one mechanism behind URL, CRL and plain baselines.

labeled pixel:   w = 1 + lambda_url * [U > tau_l]           (URL; H = 0 when off)
unlabeled pixel: w = lambda_crl * ramp(t) * [U < tau_u]     (CRL; L = 1 when off)
"""
from __future__ import annotations

import math
from typing import Union

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


def thresholds(u: torch.Tensor, tau: Scalar, mode: str) -> torch.Tensor:
    """The threshold per image, shaped to broadcast against u (B, ...).

    threshold mode: tau itself; quantile mode: the per-image tau-quantile of U.
    """
    if mode == "threshold":
        if isinstance(tau, torch.Tensor):
            return tau.to(u.dtype).reshape((1,) * u.dim())
        return torch.full((u.shape[0],) + (1,) * (u.dim() - 1), tau, dtype=u.dtype, device=u.device)
    q = torch.quantile(u.flatten(1).float(), tau.float() if isinstance(tau, torch.Tensor) else tau, dim=1).to(u.dtype)
    return q.view(-1, *([1] * (u.dim() - 1)))


def high_region(u: torch.Tensor, tau_l: Scalar, mode: str = "threshold") -> torch.Tensor:
    """H = [U > tau_l] as float."""
    return (u > thresholds(u, tau_l, mode)).float()


def low_region(u: torch.Tensor, tau_u: Scalar, mode: str = "threshold") -> torch.Tensor:
    """L = [U < tau_u] as float."""
    return (u < thresholds(u, tau_u, mode)).float()


def url_weights(u: torch.Tensor, enabled: bool, tau_l: float, lambda_url: float,
                mode: str = "threshold") -> torch.Tensor:
    if not enabled:
        return torch.ones_like(u)
    return 1.0 + lambda_url * high_region(u, tau_l, mode)


def crl_weights(u: torch.Tensor, enabled: bool, tau_u: Scalar, lambda_crl: float,
                ramp_value: Scalar, mode: str = "threshold") -> torch.Tensor:
    region = low_region(u, tau_u, mode) if enabled else torch.ones_like(u)
    return lambda_crl * ramp_value * region


def tau_u_at(t: int, total: int, tau_u: float, start: float | None) -> float:
    """tau_u, optionally ramped from `start` over training (UA-MT style)."""
    if start is None or total <= 0:
        return tau_u
    return start + (tau_u - start) * ramp(t, total)
