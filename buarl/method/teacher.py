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
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    # BCP averages the whole state dict: batch-norm running statistics are averaged too;
    # integer counters are copied.
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(alpha).add_(s, alpha=1.0 - alpha)
        else:
            t.copy_(s)
