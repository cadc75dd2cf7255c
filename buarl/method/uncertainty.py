"""Uncertainty = normalised entropy of a softmax, in [0, 1] for any number of classes."""
from __future__ import annotations

import math

import torch
from torch import nn



def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """probs (B, C, ...) summing to 1 over C -> U (B, ...) = -sum p log p / log C."""
    c = probs.shape[1]
    return -(torch.xlogy(probs, probs).sum(1)) / math.log(c)


def perturb(x: torch.Tensor, gen: torch.Generator | None, noise: float = 0.1) -> torch.Tensor:
    """x + Gaussian noise of std `noise` clamped to +-2 noise (UA-MT / SSL4MIS teacher input),
    drawn on the CPU generator so that runs are identical across devices."""
    eps = torch.randn(x.shape, generator=gen, device="cpu").to(x.device) * noise
    return x + eps.clamp(-2 * noise, 2 * noise)


@torch.no_grad()
def mc_probs(model: nn.Module, x: torch.Tensor, passes: int, gen: torch.Generator | None = None,
             noise: float = 0.1) -> torch.Tensor:
    """Mean softmax over stochastic passes (dropout on, clamped input noise), as UA-MT."""
    was_training = model.training
    model.train()
    total = 0.0
    for _ in range(passes):
        total = total + torch.softmax(model(perturb(x, gen, noise)).float(), 1)
    model.train(was_training)
    return total / passes
