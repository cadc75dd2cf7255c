"""Batch norm that normalises each of k equal parts of a batch by its own statistics within
one call of the network: the fast twin of k calls, one per part (BCP forwards its two mixed
batches as two calls, so each is normalised by its own statistics and the running statistics
take two momentum steps).

One call runs every other layer once on the whole batch and its backward has no two
gradients per parameter to sum. Eager, a norm layer runs batch norm on each part in turn and
concatenates (bit-equal to k calls); compiled, it is written as reductions over a
(k, n, C, ...) view (`per_chunk_batch_norm`), which inductor's code runs faster than the
concatenation (bench/chunk_norm.py). tests/test_chunk_norm.py checks both against k calls.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def per_chunk_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, chunks: int) -> torch.Tensor:
    """`bn` in train mode on each of `chunks` equal parts of `x` in turn, as tensor code:
    per-part mean and (biased) variance over the batch and spatial dimensions, in float32
    under autocast as batch norm's own kernels; the running statistics take one momentum
    step per part (unbiased variance), as k calls give."""
    if bn.momentum is None:
        raise ValueError("per-chunk batch norm needs a momentum (a cumulative average is not supported)")
    parts = x.unflatten(0, (chunks, -1)).float()  # (k, n, C, *spatial)
    dims = (1,) + tuple(range(3, parts.dim()))
    var, mean = torch.var_mean(parts, dim=dims, correction=0, keepdim=True)
    y = (parts - mean) * torch.rsqrt(var + bn.eps)
    channel = (1, 1, -1) + (1,) * (parts.dim() - 3)
    if bn.weight is not None:
        y = y * bn.weight.view(channel) + bn.bias.view(channel)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            count = parts.numel() // (chunks * parts.shape[2])
            for part_mean, part_var in zip(mean.reshape(chunks, -1), var.reshape(chunks, -1)):
                bn.running_mean.lerp_(part_mean, bn.momentum)
                bn.running_var.lerp_(part_var * (count / (count - 1)), bn.momentum)
            bn.num_batches_tracked.add_(chunks)
    return y.flatten(0, 1).to(x.dtype)


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
        if torch.compiler.is_compiling():
            return per_chunk_batch_norm(self, x, self.chunks)
        return torch.cat([super(_PerChunk, self).forward(part) for part in x.chunk(self.chunks)])


class BatchNorm2d(_PerChunk, nn.BatchNorm2d):
    pass


class BatchNorm3d(_PerChunk, nn.BatchNorm3d):
    pass


_TWINS = {nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def with_chunk_norms(module: nn.Module) -> nn.Module:
    """`module` with each plain batch norm turned into its per-chunk twin, in place: the same
    parameters, buffers and state-dict keys, plain batch norm until `per_chunk` asks."""
    for m in module.modules():
        if type(m) in _TWINS:
            m.__class__ = _TWINS[type(m)]
    return module


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
