"""Batch norm that can normalise each of k equal parts of a batch by its own statistics,
within one call of the network.

BCP forwards its two mixed batches as two calls of the network, so each is normalised by
its own statistics and the running statistics take two momentum steps. Two calls are
twice the kernels (or CUDA-graph launches) of the convolutions, and their backward sums
every parameter's two gradients (BENCHMARKS.md, G1). With `chunks = k` (set by
`per_chunk`) a norm layer runs batch norm on each part in turn and concatenates: the
normalisation, gradients and running statistics of k calls, while every other layer of the
network sees the whole batch at once.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class _PerChunk:
    """Mixin for a batch-norm class: in train mode, `chunks` equal parts of the batch
    normalised apart, one after another (so the running statistics take one momentum step
    per part, as k calls would); 1 (the default) is plain batch norm."""
    chunks = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks == 1 or not self.training:
            return super().forward(x)
        if x.shape[0] % self.chunks:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {self.chunks} equal chunks")
        return torch.cat([super(_PerChunk, self).forward(part) for part in x.chunk(self.chunks)])


class BatchNorm2d(_PerChunk, nn.BatchNorm2d):
    pass


class BatchNorm3d(_PerChunk, nn.BatchNorm3d):
    pass


def norms_of(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, _PerChunk)]


@contextmanager
def per_chunk(norms: list[nn.Module], chunks: int) -> Iterator[None]:
    """Within the block, `norms` normalise `chunks` parts of their batch apart."""
    for m in norms:
        m.chunks = chunks
    try:
        yield
    finally:
        for m in norms:
            m.chunks = 1
