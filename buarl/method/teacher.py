"""EMA teacher: theta_t <- a_t theta_t + (1 - a_t) theta_s, a_t = min(1 - 1/(t+1), a)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def decay_at(step: int, alpha: float) -> float:
    """SSL4MIS warm-up: the teacher follows the student closely in the first steps."""
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    # BCP averages the whole state dict: batch-norm running statistics are averaged too;
    # integer counters are copied. One foreach op per list rather than a small kernel or two
    # per tensor (the same arithmetic as t.mul_(alpha).add_(s, alpha=1 - alpha)).
    buffers = list(zip(teacher.buffers(), student.buffers()))
    pairs = list(zip(teacher.parameters(), student.parameters()))
    pairs += [(t, s) for t, s in buffers if t.dtype.is_floating_point]
    averaged, sources = [t for t, _ in pairs], [s.detach() for _, s in pairs]
    torch._foreach_mul_(averaged, alpha)
    torch._foreach_add_(averaged, sources, alpha=1.0 - alpha)
    counters = [(t, s) for t, s in buffers if not t.dtype.is_floating_point]
    if counters:
        torch._foreach_copy_([t for t, _ in counters], [s for _, s in counters])
