"""Hand-computed checks of the method's building blocks."""
import math

import numpy as np
import pytest
import torch

from buarl.method.losses import mse_consistency, region_loss, soft_dice_loss, term_loss
from buarl.method.mixing import box_mask, mix
from buarl.method.pseudo import largest_component, pseudo_labels
from buarl.method.teacher import decay_at, ema_update
from buarl.method.uncertainty import entropy_map
from buarl.method.weights import (crl_share, crl_weights, high_region, low_region, ramp, tau_u_at, weight_maps,
                                  url_term_region, url_weights)


@pytest.mark.parametrize("c", [2, 4])
def test_entropy_uniform_is_one_and_onehot_is_zero(c):
    uniform = torch.full((1, c, 2, 2), 1.0 / c)
    onehot = torch.zeros((1, c, 2, 2))
    onehot[:, 1] = 1
    assert torch.allclose(entropy_map(uniform), torch.ones(1, 2, 2))
    assert torch.equal(entropy_map(onehot), torch.zeros(1, 2, 2))


def test_entropy_hand_computed_two_class():
    p = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert entropy_map(p).item() == pytest.approx(expected, abs=1e-6)


U = torch.tensor([[[0.0, 0.3, 0.5], [0.5000001, 0.7, 1.0]]])


def test_url_weights_add_lambda_exactly_above_tau():
    w = url_weights(U, True, tau_l=0.5, lambda_url=2.0)
    assert torch.equal(w, torch.tensor([[[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]]]))
    assert torch.equal(url_weights(U, False, 0.5, 2.0), torch.ones_like(U))


def test_crl_weights_zero_exactly_where_uncertainty_not_below_tau():
    w = crl_weights(U, True, tau_u=0.5, lambda_crl=0.5, ramp_value=0.8)
    assert torch.equal(w == 0, U >= 0.5)
    assert torch.allclose(w[U < 0.5], torch.full_like(w[U < 0.5], 0.4))
    off = crl_weights(U, False, tau_u=0.5, lambda_crl=0.5, ramp_value=1.0)
    assert torch.equal(off, torch.full_like(U, 0.5))


def test_quantile_regions_take_the_top_fraction_per_image():
    u = torch.arange(100, dtype=torch.float32).view(1, 10, 10) / 99
    u = torch.cat([u, u.flip(-1) * 0.5])
    h = high_region(u, 0.8, mode="quantile")
    assert h.sum(dim=(1, 2)).tolist() == [20.0, 20.0]
    low = low_region(u, 0.3, mode="quantile")
    assert low.sum(dim=(1, 2)).tolist() == [30.0, 30.0]


def test_soft_crl_weight_falls_linearly_with_uncertainty_and_ignores_tau():
    w = crl_weights(U, True, tau_u=0.5, lambda_crl=0.5, ramp_value=0.8, reading="soft")
    assert torch.allclose(w, 0.4 * (1 - U))
    assert w[0, 1, 2] == 0.0 and w[0, 0, 0] == pytest.approx(0.4)  # U = 1 and U = 0
    assert torch.equal(crl_weights(U, True, 0.01, 0.5, 0.8, reading="soft"), w)
    assert torch.equal(crl_weights(U, False, 0.5, 0.5, 1.0, reading="soft"), torch.full_like(U, 0.5))


def test_url_term_reading_keeps_weight_one_and_gives_its_region_to_the_term():
    source = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]])
    assert torch.equal(url_weights(U, True, 0.5, 2.0, reading="term"), torch.ones_like(U))
    # H = U > 0.5 within the labeled pixels only
    assert url_term_region(U, 0.5, "threshold", source).tolist() == [[[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]]


def test_term_loss_is_ce_and_dice_of_the_region_alone_and_zero_when_it_is_empty():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2 classes, 1, 2)
    target = torch.tensor([[[0, 0]]])
    region = torch.tensor([[[1.0, 0.0]]])
    p0 = math.exp(2) / (math.exp(2) + 1)  # pixel 0's probability of class 0
    ce = -math.log(p0)
    # squared Dice over the one pixel: class 0 (p0, y 1), class 1 (1 - p0, y 0)
    dice0 = 1 - 2 * p0 / (p0 ** 2 + 1)
    dice1 = 1 - 1e-10 / ((1 - p0) ** 2 + 1e-10)
    assert term_loss(logits, target, region).item() == pytest.approx((ce + (dice0 + dice1) / 2) / 2, rel=1e-6)
    assert term_loss(logits, target, torch.zeros_like(region)).item() == 0.0


def test_quantile_regions_count_shares_of_the_given_region():
    u = torch.arange(100, dtype=torch.float32).view(1, 10, 10) / 99
    within = torch.zeros_like(u)
    within[:, :, :5] = 1  # 50 pixels
    h = high_region(u, 0.8, mode="quantile", within=within) * within
    assert h.sum().item() == 10.0  # the top 20 % of the region, not of the image
    low = crl_share(u, True, 0.3, "quantile", within) * within
    assert low.sum().item() == 15.0
    # an image with no pixel of the region: no threshold passes
    assert high_region(u, 0.5, "quantile", torch.zeros_like(u)).sum().item() == 0.0


def test_ramp_values():
    assert ramp(0, 100) == pytest.approx(math.exp(-5))
    assert ramp(50, 100) == pytest.approx(math.exp(-1.25))
    assert ramp(100, 100) == 1.0 and ramp(500, 100) == 1.0
    assert ramp(0, 0) == 1.0
    assert tau_u_at(0, 100, 0.5, None) == 0.5
    assert tau_u_at(100, 100, 0.5, 0.8) == pytest.approx(0.5)
    assert tau_u_at(0, 100, 0.5, 0.8) == pytest.approx(0.8 - 0.3 * math.exp(-5))


def test_ema_formula_and_warmup():
    t, s = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        t.weight.fill_(1.0), s.weight.fill_(3.0), t.bias.fill_(0.0), s.bias.fill_(10.0)
    ema_update(t, s, 0.9)
    assert t.weight.item() == pytest.approx(1.2) and t.bias.item() == pytest.approx(1.0)
    assert decay_at(0, 0.99) == 0.0 and decay_at(1, 0.99) == 0.5 and decay_at(9, 0.99) == 0.9
    assert decay_at(1000, 0.99) == 0.99


def test_ema_averages_batchnorm_statistics():
    t, s = torch.nn.BatchNorm1d(1), torch.nn.BatchNorm1d(1)
    s.running_mean.fill_(2.0)
    s.num_batches_tracked.fill_(7)
    ema_update(t, s, 0.75)
    assert t.running_mean.item() == pytest.approx(0.5)
    assert t.num_batches_tracked.item() == 7


def test_box_mask_and_mix_share_one_mask():
    gen = torch.Generator().manual_seed(0)
    m = box_mask((12, 9), 2 / 3, gen)
    assert (m == 0).sum().item() == 8 * 6
    img_a, img_b = torch.zeros(2, 1, 12, 9), torch.ones(2, 1, 12, 9)
    lab_a, lab_b = torch.full((2, 12, 9), 1), torch.full((2, 12, 9), 3)
    w_a, w_b = torch.full((2, 12, 9), 0.5), torch.full((2, 12, 9), 2.0)
    x, y, w = mix(img_a, img_b, m), mix(lab_a, lab_b, m), mix(w_a, w_b, m)
    inside = (m == 0).expand(2, 12, 9)
    assert torch.equal(x[:, 0] == 1, inside)
    assert torch.equal(y == 3, inside) and torch.equal(w == 2.0, inside)
    m3 = box_mask((9, 9, 6), 2 / 3, gen)
    assert (m3 == 0).sum().item() == 6 * 6 * 4


def test_region_loss_hand_computed():
    # Two classes, zero logits: p = 0.5 everywhere, CE = log 2 per pixel.
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    ones = torch.ones(1, 1, 2)
    # Dice per class: inter = 0.5, |y| = 1, |p|^2 = 0.5 -> 1 - 1/1.5 (plus smoothing)
    dice = 1 - (2 * 0.5 + 1e-5) / (0.5 + 1 + 1e-5)
    assert soft_dice_loss(torch.softmax(logits, 1), target, ones).item() == pytest.approx(dice, rel=1e-5)
    assert region_loss(logits, target, ones, ones).item() == pytest.approx((math.log(2) + dice) / 2, rel=1e-5)
    # A constant weight c on the unlabeled region scales its term by c (BCP's u_weight).
    zeros = torch.zeros_like(ones)
    assert region_loss(logits, target, 0.5 * ones, zeros).item() == pytest.approx(
        0.5 * (math.log(2) + dice) / 2, rel=1e-5)
    # Zero weight: the region contributes nothing.
    assert region_loss(logits, target, zeros, zeros).item() == 0.0


def test_region_loss_normalises_each_source_by_its_area():
    logits = torch.zeros(1, 2, 1, 4)
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    source = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    w = torch.ones(1, 1, 4)
    # Each region is averaged over its own area, so a 1-pixel and a 3-pixel region
    # count as much as two whole images.
    diff = region_loss(logits, target, w, source) - region_loss(logits, target, w, torch.ones_like(source)) * 2
    assert abs(diff.item()) < 1e-5


def test_mse_consistency_hand_computed():
    # Student p = (0.5, 0.5) everywhere; teacher (1, 0) on pixel 0 and (0.5, 0.5) on pixel 1.
    logits = torch.zeros(1, 2, 1, 2)
    teacher = torch.tensor([[[[1.0, 0.5]], [[0.0, 0.5]]]])
    # pixel 0: mean over classes of (0.25, 0.25) = 0.25; pixel 1: 0; normalised by 2 pixels
    assert mse_consistency(logits, teacher, torch.ones(1, 1, 2)).item() == pytest.approx(0.125)
    # A per-pixel weight scales each pixel's term (CRL masks it), the normaliser stays the area.
    assert mse_consistency(logits, teacher, torch.tensor([[[0.1, 7.0]]])).item() == pytest.approx(0.0125)
    assert mse_consistency(logits, teacher, torch.tensor([[[0.0, 1.0]]])).item() == 0.0


def test_pseudo_labels_keep_largest_component_per_class():
    probs = torch.zeros(1, 3, 6, 6)
    probs[:, 0] = 1
    probs[0, 0, 0:3, 0:3], probs[0, 1, 0:3, 0:3] = 0, 1   # class 1: 9 pixels
    probs[0, 0, 5, 5], probs[0, 1, 5, 5] = 0, 1           # class 1: stray pixel
    probs[0, 0, 4, 0:2], probs[0, 2, 4, 0:2] = 0, 1       # class 2: 2 pixels
    out = pseudo_labels(probs, lcc=True)
    assert (out == 1).sum() == 9 and out[0, 5, 5] == 0 and (out == 2).sum() == 2
    assert (pseudo_labels(probs, lcc=False) == 1).sum() == 10
    blob = np.zeros((5, 5), bool)
    blob[0, 0] = blob[3:5, 3:5] = True
    assert largest_component(blob).sum() == 4


def _largest_one_by_one(mask, connectivity):
    """The reference semantics: label one mask alone, keep the most frequent non-zero id
    (BCP's np.argmax(np.bincount(labels.flat)[1:]) + 1)."""
    from scipy import ndimage
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if connectivity == "full" else 1)
    labels, n = ndimage.label(mask, structure)
    if n == 0:
        return mask.astype(bool)
    return labels == np.argmax(np.bincount(labels.flat)[1:]) + 1


@pytest.mark.parametrize("shape", [(7, 16, 16), (3, 10, 9, 8)])
@pytest.mark.parametrize("connectivity", ["full", "face"])
def test_stacked_largest_components_equal_one_mask_at_a_time(shape, connectivity):
    from buarl.method.pseudo import largest_components
    rng = np.random.default_rng(0)
    masks = rng.random(shape) < 0.45  # many components, ties included
    masks[1] = False                   # an empty mask stays empty
    got = largest_components(masks, connectivity)
    for i in range(shape[0]):
        assert np.array_equal(got[i], _largest_one_by_one(masks[i], connectivity)), i


@pytest.mark.parametrize("mode", ["threshold", "quantile"])
@pytest.mark.parametrize("url_mode, crl_mode", [("weight", "hard"), ("term", "soft"), ("weight", "soft")])
@pytest.mark.parametrize("url, crl", [(True, True), (False, False)])
def test_the_steps_weight_maps_are_the_per_pixel_formulas(mode, url_mode, crl_mode, url, crl):
    """weight_maps (one pass over the regions, what the loop calls) against url_weights,
    crl_weights and url_term_region composed by hand."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2, 8, 8, generator=g)
    source = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    w, term, stats = weight_maps(u, source, url=url, crl=crl, tau_l=0.7, tau_u=0.4, lambda_url=2.0, lambda_crl=0.5,
                                 ramp_value=0.8, mode=mode, url_mode=url_mode, crl_mode=crl_mode)
    want = source * url_weights(u, url, 0.7, 2.0, mode, source, url_mode) + \
        (1 - source) * crl_weights(u, crl, 0.4, 0.5, 0.8, mode, 1 - source, crl_mode)
    assert torch.allclose(w, want)
    if url and url_mode == "term":
        assert torch.equal(term, url_term_region(u, 0.7, mode, source))
    else:
        assert term is None
    lab = source.sum()
    assert stats["frac_high"] == pytest.approx(float((high_region(u, 0.7, mode, source) * source).sum() / lab))
