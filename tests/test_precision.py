"""Precision on the machine at hand: `auto` (bf16 on CPUs with native bf16, fp32 elsewhere)
must be deterministic and finite in 2-D and 3-D, and forced bf16 must be finite in 3-D even
where oneDNN's bf16 weight gradient of a depth-2 input is broken (issue 10)."""
import math

import pytest
import torch

from buarl.config import load_config
from buarl.nets.vnet import Conv3d, VNet
from buarl.engine import precision_of
from buarl.train import Reporter, train


class Losses(Reporter):
    def __init__(self):
        self.losses = []

    def log(self, step, scalars):
        self.losses.append(scalars["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("config, phantom", [("phantom", "acdc_phantom"), ("phantom_la", "la_phantom")])
def test_auto_precision_same_seed_same_metrics(config, phantom, request):
    # phantom_la's 32^3 patch has a 2x2x2 VNet bottleneck: the shape oneDNN's bf16 kernel broke.
    cfg = load_config(config, {"data_root": str(request.getfixturevalue(phantom)), "pretrain_iters": 3,
                               "iters": 4, "eval_every": 7, "log_every": 1, "precision": "auto"})
    print(f"{config}: precision auto resolves to {precision_of(cfg, torch.device('cpu'))} on this CPU")
    runs = [Losses(), Losses()]
    first, second = (train(cfg, r) for r in runs)
    assert len(runs[0].losses) == 7 and all(math.isfinite(v) for v in runs[0].losses)
    assert runs[0].losses == runs[1].losses
    for k in ("dice", "jaccard", "hd95", "asd", "best_val_dice"):
        assert first[k] == second[k], k


def test_forced_bf16_vnet_tiny_input_is_finite_and_repeatable():
    torch.manual_seed(0)
    net = VNet().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    y = (x[:, 0] > 0.5).long()
    grads = []
    for _ in range(2):
        torch.manual_seed(1)  # the same dropout masks
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x).float()
        assert torch.isfinite(logits).all()
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for name, g in grads[0].items():
        assert torch.isfinite(g).all(), name
        assert torch.equal(g, grads[1][name]), name


def test_depth_two_convolution_leaves_bf16_and_others_stay():
    conv = Conv3d(4, 4, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(1, 4, 2, 4, 4)).dtype == torch.float32  # the broken kernel avoided
        assert conv(torch.randn(1, 4, 4, 4, 4)).dtype == torch.bfloat16
    assert conv(torch.randn(1, 4, 2, 4, 4)).dtype == torch.float32
