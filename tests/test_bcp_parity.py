"""The `bcp` base against BCP's own ACDC script (code/ACDC_BCP_train.py, DeepMed-Lab-ECNU/BCP
at 7879f98), one test per point where the loop used to differ (issue 11). Each expected value
is BCP's semantics written out here by hand, not taken from the loop."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import buarl.train as train_module
from buarl.config import load_config
from buarl.method.losses import soft_dice_loss
from buarl.method.pseudo import pseudo_labels
from buarl.train import Loop, Reporter, lr_at, train


class Record(Reporter):
    def __init__(self):
        self.logs, self.states, self.warnings, self.metrics = [], {}, [], {}

    def log(self, step, scalars):
        self.logs.append((step, scalars))

    def checkpoint(self, step, metrics, state, is_best):
        self.states[step] = copy.deepcopy(state)
        self.metrics[step] = metrics

    def warn(self, step, message):
        self.warnings.append((step, message))


def _cfg(root, **sets):
    return load_config("phantom", {"data_root": str(root), "precision": "fp32", "url": False, "crl": False,
                                   "log_every": 1, **sets})


def _fixed_val_dice(monkeypatch, values):
    """Validation returns the given Dice values in order (model selection under test control)."""
    it = iter(values)
    monkeypatch.setattr(train_module, "validation_scores",
                        lambda *a: {"dice": next(it), "fg_pred": 0.1, "fg_true": 0.1})


def test_bcp_defaults_are_bcps_and_mt_keeps_its_warmup():
    acdc = load_config("acdc_cpu")
    assert (acdc.ema_warmup, acdc.teacher_mode, acdc.lr_schedule, acdc.self_train_init,
            acdc.self_train_optimizer, acdc.lcc_connectivity, acdc.split_forward, acdc.dice_smooth) == \
        (False, "train", "constant", "best", "keep", "full", True, 1e-10)
    assert load_config("la").self_train_optimizer == "reset"  # BCP's LA script loads weights only
    assert load_config("acdc_cpu", {"base": "mt"}).ema_warmup is True
    assert load_config("acdc_cpu", {"base": "mt", "ema_warmup": False}).ema_warmup is False


def test_first_self_training_step_keeps_099_of_the_pretrained_teacher(acdc_phantom):
    rec = Record()
    cfg = _cfg(acdc_phantom, pretrain_iters=2, iters=1, eval_every=1)
    train(cfg, rec)
    pretrained = rec.states[2]["pre_best"]["weights"]
    student, teacher = rec.states[3]["student"], rec.states[3]["teacher"]
    names = [n for n, _ in Loop(cfg, Reporter(), lambda m: m).core.named_parameters()]
    for n in names:  # parameters: BN statistics of a train-mode teacher also move by its own forwards
        expected = 0.99 * pretrained[n] + 0.01 * student[n]
        assert torch.allclose(teacher[n], expected, atol=1e-7), n
    assert not all(torch.equal(teacher[n], student[n]) for n in names)


def test_learning_rate_is_constant_across_both_stages_as_bcps_acdc(acdc_phantom):
    rec = Record()
    train(_cfg(acdc_phantom, pretrain_iters=3, iters=4, eval_every=10), rec)
    assert [s["lr"] for _, s in rec.logs] == [0.03] * 7  # phantom lr, never decayed
    la = load_config("la")  # BCP's LA: constant pre-training, x0.1 at every 2500 self-training steps
    assert [lr_at(la, t, 2000, "pretrain") for t in (0, 1999)] == [0.01, 0.01]
    assert [lr_at(la, t, 15000, "self") for t in (0, 2499, 2500, 5000)] == \
        pytest.approx([0.01, 0.01, 0.001, 0.0001])


def test_pseudo_labels_come_from_a_train_mode_teacher_in_two_calls_of_half(acdc_phantom):
    """BCP calls its train-mode teacher once per unlabeled half, so each batch norm sees one
    half: the loop makes one call whose norms take the halves apart."""
    loop = Loop(_cfg(acdc_phantom, pretrain_iters=0, iters=1), Reporter(), lambda m: m)
    calls = []
    norm = next(m for m in loop.teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    loop.teacher.register_forward_pre_hook(lambda mod, args: calls.append((mod.training, args[0].shape[0],
                                                                           norm.chunks)))
    lab, unl = loop.sampler.next()
    x_l, y_l = loop.data.batch(lab, loop.gen)
    loop.bcp_step(x_l, y_l, loop.data.batch(unl, loop.gen)[0], t=0)
    # phantom: 4 unlabeled images, BCP's two teacher calls of 2 (ACDC: 2 of 6), no labeled call
    assert calls == [(True, 4, 2)]


def test_self_training_starts_from_the_best_pretraining_checkpoint(acdc_phantom, monkeypatch):
    # pretrain_iters=3 is no multiple of eval_every=2: validated at 2 and at the end, 3.
    _fixed_val_dice(monkeypatch, [0.6, 0.2, 0.1, 0.1])
    rec = Record()
    cfg = _cfg(acdc_phantom, pretrain_iters=3, iters=2, eval_every=2)
    started = {}
    original = Loop.start_self_training

    def spy(self):
        original(self)
        started.update(student=copy.deepcopy(self.core.state_dict()), teacher=copy.deepcopy(self.teacher.state_dict()),
                       optimizer=copy.deepcopy(self.optimizer.state_dict()))
    monkeypatch.setattr(Loop, "start_self_training", spy)
    train(cfg, rec)
    assert sorted(rec.states) == [2, 3, 4, 5]
    best = rec.states[2]  # val 0.6 at iteration 2 beats 0.2 at the end of pre-training
    for n, v in best["student"].items():
        assert torch.equal(started["student"][n], v) and torch.equal(started["teacher"][n], v), n
    assert not all(torch.equal(started["student"][n], v) for n, v in rec.states[3]["student"].items())
    momentum = {k: s["momentum_buffer"] for k, s in started["optimizer"]["state"].items()}
    assert momentum and all(torch.equal(v, best["optimizer"]["state"][k]["momentum_buffer"])
                            for k, v in momentum.items())


def test_reset_optimizer_and_last_iterate_switches(acdc_phantom, monkeypatch):
    _fixed_val_dice(monkeypatch, [0.6, 0.2, 0.1])
    loop = Loop(_cfg(acdc_phantom, pretrain_iters=2, iters=1, eval_every=1, self_train_init="last",
                     self_train_optimizer="reset"), Reporter(), lambda m: m)
    seen = {}
    original = loop.start_self_training

    def spy():
        seen["before"] = copy.deepcopy(loop.core.state_dict())
        original()
        seen.update(after=copy.deepcopy(loop.core.state_dict()), state=dict(loop.optimizer.state))
    loop.start_self_training = spy
    loop.run()
    assert all(torch.equal(seen["before"][k], v) for k, v in seen["after"].items())  # the last iterate
    assert seen["state"] == {}  # momentum cleared


def test_clean_up_keeps_a_diagonally_connected_region():
    probs = torch.zeros(1, 2, 6, 6)
    probs[:, 0] = 1
    fg = np.zeros((6, 6), bool)
    fg[0, 0] = fg[1, 1] = fg[2, 2] = True  # 3 pixels touching at corners
    fg[4:6, 5] = True                       # 2 face-connected pixels
    probs[0, 1][torch.from_numpy(fg)], probs[0, 0][torch.from_numpy(fg)] = 1, 0
    full = pseudo_labels(probs, lcc=True)[0].numpy()
    assert full.sum() == 3 and full[1, 1] == 1 and full[5, 5] == 0  # skimage's (BCP's) 8-connectivity
    face = pseudo_labels(probs, lcc=True, connectivity="face")[0].numpy()
    assert face.sum() == 2 and face[5, 5] == 1


def test_dice_smoothing_is_bcps_1e_10():
    probs = torch.tensor([1 - 1e-6, 1e-6], dtype=torch.float64).view(1, 2, 1, 1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    mask = torch.ones(1, 1, 1)
    # class 0: (2(1-e) + s)/((1-e)^2 + 1 + s); class 1 absent: s / (e^2 + s), e = 1e-6, s = 1e-10
    e, s = 1e-6, 1e-10
    expected = 1 - ((2 * (1 - e) + s) / ((1 - e) ** 2 + 1 + s) + s / (e * e + s)) / 2
    assert soft_dice_loss(probs, target, mask.double()).item() == pytest.approx(expected, rel=1e-9)
    assert load_config("phantom").dice_smooth == 1e-10 and load_config("la").dice_smooth == 1e-5


def _bcp_dice(soft, target, mask, n_classes, smooth=1e-10):
    """BCP's DiceLoss with a mask, written out: per class over the whole batch, squares in
    the denominator, mean over all classes."""
    total = 0.0
    for c in range(n_classes):
        t = (target == c).float()
        inter = (soft[:, c] * t * mask).sum()
        y = (t * t * mask).sum()
        z = (soft[:, c] * soft[:, c] * mask).sum()
        total = total + 1 - (2 * inter + smooth) / (z + y + smooth)
    return total / n_classes


def _bcp_mix_loss(out, img_l, patch_l, mask, u_weight=0.5, unlab=False, dice_fn=None):
    """BCP's mix_loss: `mask` 1 outside the pasted box (the image's own region); the Dice is
    its ACDC DiceLoss unless `dice_fn(logits, target, mask)` is given (LA's)."""
    image_w, patch_w = (u_weight, 1.0) if unlab else (1.0, u_weight)
    dice_fn = dice_fn or (lambda o, t, m: _bcp_dice(torch.softmax(o, 1), t, m, o.shape[1]))
    dice = dice_fn(out, img_l, mask) * image_w + dice_fn(out, patch_l, 1 - mask) * patch_w
    ce_img = F.cross_entropy(out, img_l, reduction="none")
    ce_patch = F.cross_entropy(out, patch_l, reduction="none")
    ce = image_w * (ce_img * mask).sum() / (mask.sum() + 1e-16) + \
        patch_w * (ce_patch * (1 - mask)).sum() / ((1 - mask).sum() + 1e-16)
    return dice, ce


def _lcc_8(labels):
    out = np.zeros_like(labels)
    for b in range(labels.shape[0]):
        for c in range(1, 4):
            lab, n = ndimage.label(labels[b] == c, np.ones((3, 3)))
            if n:
                out[b][lab == 1 + np.argmax(np.bincount(lab.flat)[1:])] = c
    return out


def _bcp_step_then_rewind(loop):
    """One batch through the loop's bcp step, then its box draw and dropout RNG rewound, so
    the hand-written reference repeats the same draws, call for call. The loop draws both
    halves' dropout masks in one call, BCP in two (the same draws in another order): dropout
    goes off in both networks, which the reference shares."""
    for module in (*loop.core.modules(), *loop.teacher.modules()):
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):  # Dropout and VNet's Dropout3d
            module.p = 0.0
    lab, unl = loop.sampler.next()
    x_l, y_l = loop.data.batch(lab, loop.gen)
    x_u = loop.data.batch(unl, loop.gen)[0]
    gen_state, rng_state = loop.gen.get_state(), torch.get_rng_state()
    loss, _ = loop.bcp_step(x_l, y_l, x_u, t=0)
    loop.gen.set_state(gen_state)
    torch.set_rng_state(rng_state)
    return loss, x_l, y_l, x_u


def test_bcp_loss_equals_bcps_mix_loss_with_two_forwards_of_half(acdc_phantom):
    loop = Loop(_cfg(acdc_phantom, pretrain_iters=0, iters=1, batch_size=8, labeled_bs=4), Reporter(), lambda m: m)
    loss, x_l, y_l, x_u = _bcp_step_then_rewind(loop)
    h = 2
    img_a, img_b, lab_a, lab_b = x_l[:h], x_l[h:], y_l[:h], y_l[h:]
    uimg_a, uimg_b = x_u[:h], x_u[h:]
    teacher, model = loop.teacher.train(), loop.core
    with torch.no_grad():
        plab_a = torch.from_numpy(_lcc_8(teacher(uimg_a).softmax(1).argmax(1).numpy()))
        plab_b = torch.from_numpy(_lcc_8(teacher(uimg_b).softmax(1).argmax(1).numpy()))
    box = loop.gen  # the same box draw as the loop's
    from buarl.method.mixing import box_mask
    img_mask = box_mask(tuple(x_l.shape[2:]), 2 / 3, box)  # 1 outside the box
    loss_mask = img_mask.expand(h, *img_mask.shape)
    net_input_unl = uimg_a * img_mask + img_a * (1 - img_mask)
    net_input_l = img_b * img_mask + uimg_b * (1 - img_mask)
    out_unl, out_l = model(net_input_unl), model(net_input_l)
    unl_dice, unl_ce = _bcp_mix_loss(out_unl, plab_a, lab_a, loss_mask, unlab=True)
    l_dice, l_ce = _bcp_mix_loss(out_l, lab_b, plab_b, loss_mask)
    expected = (unl_dice + l_dice + unl_ce + l_ce) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_collapse_warns_and_foreground_fractions_are_logged(acdc_phantom, monkeypatch):
    _fixed_val_dice(monkeypatch, [0.5, 0.8, 0.3])
    rec = Record()
    train(_cfg(acdc_phantom, pretrain_iters=2, iters=4, eval_every=2), rec)
    assert [s for s, _ in rec.warnings] == [6]  # 0.3 < half of 0.8; 0.8 and 0.5 are not
    assert "below half of its best 0.800" in rec.warnings[0][1]
    assert all("val_fg" in m and "val_fg_true" in m for m in rec.metrics.values())
    assert all(0 <= s["pseudo_fg"] <= 1 for _, s in rec.logs if s["stage"] == "self")


# ---- LA: BCP's own LA script (code/LA_BCP_train.py, utils/losses.py mask_DiceLoss) ----------

def _bcp_la_dice(out, target, mask=None, smooth=1e-5):
    """BCP's LA mask_DiceLoss written out: softmax, per image and class sums over voxels,
    p + y below, the mean over images and classes (background included)."""
    soft = torch.softmax(out, 1)
    n, c = out.shape[:2]
    total = 0.0
    for i in range(n):
        for k in range(c):
            t = (target[i] == k).float()
            m = torch.ones_like(t) if mask is None else mask[i].float()
            inter = (soft[i, k] * t * m).sum()
            union = ((soft[i, k] + t) * m).sum()
            total = total + 1 - (2 * inter + smooth) / (union + smooth)
    return total / (n * c)


def test_la_dice_is_bcps_mask_dice_loss_per_image_with_p_plus_y():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 2, 5, 4, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 2, (2, 5, 4, 3), generator=g)
    mask = (torch.rand(2, 5, 4, 3, generator=g) > 0.3).double()
    got = soft_dice_loss(torch.softmax(out, 1), target, mask, smooth=1e-5, form="linear")
    assert got.item() == pytest.approx(_bcp_la_dice(out, target, mask).item(), rel=1e-12)
    # the ACDC form differs on the same tensors (so the switch matters)
    assert abs(soft_dice_loss(torch.softmax(out, 1), target, mask, smooth=1e-5).item() - got.item()) > 1e-3
    la, acdc = load_config("la"), load_config("acdc")
    assert (la.dice_form, la.pretrain_loss, acdc.dice_form, acdc.pretrain_loss) == \
        ("linear", "whole", "squared", "regions")


def _la_cfg(root, **sets):
    return load_config("phantom_la", {"data_root": str(root), "precision": "fp32", "url": False, "crl": False,
                                      "log_every": 1, **sets})


def test_la_pretraining_loss_is_ce_plus_dice_over_the_whole_mixed_volume(la_phantom):
    loop = Loop(_la_cfg(la_phantom, pretrain_iters=1, iters=1), Reporter(), lambda m: m)
    lab, _ = loop.sampler.next()
    x_l, y_l = loop.data.batch(lab, loop.gen)
    gen_state, rng_state = loop.gen.get_state(), torch.get_rng_state()
    loss, _ = loop.pretrain_step(x_l, y_l)

    loop.gen.set_state(gen_state)
    torch.set_rng_state(rng_state)
    from buarl.method.mixing import box_mask
    img_mask = box_mask(tuple(x_l.shape[2:]), 2 / 3, loop.gen)  # 1 outside the box
    volume = x_l[:1] * img_mask + x_l[1:] * (1 - img_mask)
    label = (y_l[:1] * img_mask + y_l[1:] * (1 - img_mask)).long()
    out = loop.core(volume)
    expected = (F.cross_entropy(out, label) + _bcp_la_dice(out, label)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_la_bcp_loss_equals_bcps_la_mix_loss(la_phantom):
    loop = Loop(_la_cfg(la_phantom, pretrain_iters=0, iters=1), Reporter(), lambda m: m)
    loss, x_l, y_l, x_u = _bcp_step_then_rewind(loop)
    teacher, model = loop.teacher.train(), loop.core
    with torch.no_grad():  # BCP's LA get_cut_mask: p(class 1) >= 0.5, largest 26-connected component
        plab = []
        for u in (x_u[:1], x_u[1:]):
            fg = (teacher(u).softmax(1)[:, 1] >= 0.5).numpy()[0]
            lab_ids, n = ndimage.label(fg, np.ones((3, 3, 3)))
            keep = lab_ids == 1 + np.argmax(np.bincount(lab_ids.flat)[1:]) if n else fg
            plab.append(torch.from_numpy(keep[None].astype(np.int64)))
    from buarl.method.mixing import box_mask
    img_mask = box_mask(tuple(x_l.shape[2:]), 2 / 3, loop.gen)
    loss_mask = img_mask.expand(1, *img_mask.shape)

    def mix_loss(out, img_l, patch_l, mask, unlab=False):  # BCP_utils.mix_loss with its LA Dice
        return sum(_bcp_mix_loss(out, img_l, patch_l, mask, unlab=unlab, dice_fn=_bcp_la_dice)) / 2

    # the loop pairs the halves as BCP's ACDC script (unlabeled outside the box first); the
    # LA script's order swaps which draw is which, the same two kinds of mixed volume
    out_1 = model(x_u[:1] * img_mask + x_l[:1] * (1 - img_mask))
    out_2 = model(x_l[1:] * img_mask + x_u[1:] * (1 - img_mask))
    expected = mix_loss(out_1, plab[0], y_l[:1], loss_mask, unlab=True) + mix_loss(out_2, y_l[1:], plab[1], loss_mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
