"""Per-chunk batch norm in one call (buarl/fast/chunk_norm.py) is batch norm run on each
chunk in turn: outputs, gradients and running statistics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from buarl.fast.chunk_norm import BatchNorm2d, BatchNorm3d, norms_of, per_chunk, per_chunk_batch_norm


def test_two_chunks_by_hand():
    """One channel, chunks [0, 2] and [4, 8]: means 1 and 6, biased variances 1 and 4
    (unbiased 2 and 8). Each chunk normalises to [-1, 1]; from (0, 1) with momentum 0.1 the
    running mean goes to 0.1 then 0.09 + 0.6 = 0.69, the variance to 1.1 then 0.99 + 0.8."""
    x = torch.tensor([0.0, 2.0, 4.0, 8.0]).view(4, 1, 1, 1)
    for way in ("eager", "reductions"):
        bn = BatchNorm2d(1, eps=1e-8)
        if way == "eager":
            with per_chunk([bn], 2):
                y = bn(x)
        else:
            y = per_chunk_batch_norm(bn, x, 2)
        assert torch.allclose(y.flatten(), torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-6), way
        assert torch.allclose(bn.running_mean, torch.tensor([0.69])), way
        assert torch.allclose(bn.running_var, torch.tensor([1.79])), way
        assert bn.num_batches_tracked.item() == 2 and bn.chunks == 1  # the block restores one chunk
    whole = BatchNorm2d(1)
    whole(x)  # one batch: mean 3.5, not what two chunks give
    assert torch.allclose(whole.running_mean, torch.tensor([0.35]))


@pytest.mark.parametrize("norm, shape, fmt", [
    (BatchNorm2d, (8, 3, 5, 6), torch.contiguous_format),
    (BatchNorm2d, (8, 3, 5, 6), torch.channels_last),
    (BatchNorm3d, (8, 3, 4, 5, 3), torch.channels_last_3d),
])
@pytest.mark.parametrize("chunks", [2, 4])
@pytest.mark.parametrize("way", ["eager", "reductions"])
def test_one_call_equals_one_call_per_chunk(norm, shape, fmt, chunks, way):
    """Eager, a norm layer runs batch norm per part and concatenates: bit-equal to a call per
    part. Compiled code runs `per_chunk_batch_norm`'s reductions instead (checked here
    eager): equal to rounding."""
    g = torch.Generator().manual_seed(chunks)
    x = (torch.randn(shape, generator=g) * torch.arange(1, shape[0] + 1).view(-1, *[1] * (len(shape) - 1)))
    x = x.contiguous(memory_format=fmt).requires_grad_()
    seen = torch.randn(shape, generator=g)
    ref = norm(shape[1])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0, generator=g)
        ref.bias.normal_(generator=g)
        ref.running_mean.normal_(generator=g)
        ref.running_var.uniform_(0.5, 2.0, generator=g)
    bn = copy.deepcopy(ref)
    x_ref = x.detach().clone().requires_grad_()
    want = torch.cat([ref(part) for part in x_ref.chunk(chunks)])
    (want * seen).sum().backward()
    if way == "eager":
        with per_chunk([bn], chunks):
            got = bn(x)
    else:
        got = per_chunk_batch_norm(bn, x, chunks)
    (got * seen).sum().backward()
    assert got.is_contiguous(memory_format=fmt)  # channels-last stays channels-last
    if way == "eager":
        assert torch.equal(got, want) and torch.equal(x.grad, x_ref.grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(bn, name), getattr(ref, name)), name
    else:
        assert torch.allclose(got, want, atol=1e-5) and torch.allclose(x.grad, x_ref.grad, atol=1e-4)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(bn, name).double(), getattr(ref, name).double(), atol=1e-6), name
    for a, b in ((bn.weight, ref.weight), (bn.bias, ref.bias)):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5)  # summed in another order
    assert bn.num_batches_tracked.item() == chunks
    plain = F.batch_norm(x.detach(), None, None, ref.weight, ref.bias, True)
    assert not torch.allclose(got, plain, atol=1e-2)  # the chunks' statistics differ from the batch's


def test_a_batch_that_does_not_split_evenly_is_refused():
    bn = BatchNorm2d(2)
    with per_chunk([bn], 2), pytest.raises(ValueError, match="5 does not split into 2"):
        bn(torch.randn(5, 2, 3, 3))
    assert bn.chunks == 1


def test_the_engine_turns_every_norm_of_a_network_into_its_per_chunk_twin():
    """The networks hold plain batch norm; the engine's twins keep each norm's state dict."""
    from buarl.fast.chunk_norm import with_chunk_norms
    from buarl.nets import build

    for dataset, norm in (("acdc", BatchNorm2d), ("la", BatchNorm3d)):
        net = build(dataset, 2)
        plain = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert plain and norms_of(net) == []
        before = {k: v.clone() for k, v in net.state_dict().items()}
        assert with_chunk_norms(net) is net
        assert norms_of(net) == plain and all(type(m) is norm for m in plain)
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and net.state_dict().keys() == before.keys()
