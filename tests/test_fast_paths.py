"""The fast twins (buarl/fast/) compute what the plain functions do: the one-pass batched
augmentation, connected components on the device, the foreach EMA; and the engine picks
them, the precision and the compile mode as documented."""
from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch

from buarl.data.augment import augment_2d, augment_batch_2d, draw_2d
from buarl.engine import SplitForward, _graph
from buarl.fast import augment as fast_augment
from buarl.fast import components
from buarl.fast.chunk_norm import norms_of, with_chunk_norms
from buarl.method.losses import region_loss
from buarl.method.pseudo import keep_largest, largest_components
from buarl.method.teacher import ema_update
from buarl.nets import build
from tests.conftest import load_bench


def device_largest(masks, connectivity: str, graph=lambda fn: fn) -> torch.Tensor:
    """The device twin on a stack of binary masks (a label map of one foreground class)."""
    return components.KeepLargest(2, connectivity, graph)(torch.as_tensor(masks).long()).bool()


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("size", [40, 41])
def test_batched_augmentation_equals_per_sample_augmentation(size, one_pass):
    """The plain batched augmentation (groups of rot90 + flip) and its one-pass device twin
    (square images only) both equal `augment_2d` sample by sample."""
    if one_pass and size % 2:
        size += 1
    g = torch.Generator().manual_seed(3)
    images = torch.rand(64, 1, size, size, generator=g)
    labels = torch.randint(0, 4, (64, size, size), generator=g)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    reference = [augment_2d(i, l, g1) for i, l in zip(images, labels)]
    x, y = (fast_augment.augment_batch_2d if one_pass else augment_batch_2d)(images, labels, g2)
    assert torch.equal(x, torch.stack([r[0] for r in reference]))
    assert torch.equal(y, torch.stack([r[1] for r in reference]))
    assert torch.equal(g1.get_state(), g2.get_state())  # the stream goes on identically
    # the batch really held every kind (else the equality above proves less)
    g3 = torch.Generator().manual_seed(11)
    assert {draw_2d(g3)[0] for _ in range(64)} == {"rot90", "rotate", "none"}


def test_compiled_one_pass_augmentation_equals_eager():
    """A compiled run samples the batch through one compiled graph (inductor's affine grid
    and nearest sampling). rot90 + flip and "none" land on pixel centres: equal. A rotation's
    sampling points can fall on a tie between two pixels, where the graph's rounding may
    pick the other neighbour: a handful of pixels (13 of 2.1 M rotated ones at 256², seed 3)."""
    g = torch.Generator().manual_seed(3)
    images = torch.rand(32, 1, 256, 256, generator=g)
    labels = torch.randint(0, 4, (32, 256, 256), generator=g)
    x, y = fast_augment.augment_batch_2d(images, labels, torch.Generator().manual_seed(11))
    theta = fast_augment.draw_thetas(32, torch.Generator().manual_seed(11))
    xc, yc = _graph(fast_augment.sample)(images, labels, theta)
    g3 = torch.Generator().manual_seed(11)
    rotated = torch.tensor([draw_2d(g3)[0] == "rotate" for _ in range(32)])
    assert 0 < rotated.sum() < 32
    assert torch.equal(x[~rotated], xc[~rotated]) and torch.equal(y[~rotated], yc[~rotated])
    differ = (y[rotated] != yc[rotated]).float().mean()
    assert differ < 1e-4 and (x[rotated] != xc[rotated]).float().mean() < 1e-4, differ
    assert xc.is_contiguous() and yc.dtype == torch.long


@pytest.mark.parametrize("size", [5, 40, 41, 256])
def test_rot90_and_flip_as_an_affine_map_are_exact(size):
    """The batched path samples rot90 + flip through grid_sample: every pixel must land
    exactly where torch.rot90 and torch.flip put it, at odd and even sizes."""
    image = torch.rand(1, 2, size, size, generator=torch.Generator().manual_seed(size))
    for k in range(4):
        for axis in range(2):
            theta = fast_augment.rot90_flip_theta(k, axis)[None]
            grid = torch.nn.functional.affine_grid(theta, list(image.shape), align_corners=False)
            got = torch.nn.functional.grid_sample(image, grid, mode="nearest", align_corners=False)
            assert torch.equal(got, torch.flip(torch.rot90(image, k, (2, 3)), (axis + 2,))), (k, axis)


def test_augmentation_draws_follow_the_protocol_distribution():
    """SSL4MIS RandomGenerator: p=1/2 rot90 (k uniform in 0..3) + flip (axis uniform), else
    p=1/2 a rotation with angle uniform in [-20, 20)."""
    g = torch.Generator().manual_seed(0)
    draws = [draw_2d(g) for _ in range(20000)]
    kinds = Counter(d[0] for d in draws)
    assert abs(kinds["rot90"] / 20000 - 0.5) < 0.015
    assert abs(kinds["rotate"] / 20000 - 0.25) < 0.015
    ks = Counter(d[1] for d in draws if d[0] == "rot90")
    axes = Counter(d[2] for d in draws if d[0] == "rot90")
    assert set(ks) == {0, 1, 2, 3} and max(ks.values()) / min(ks.values()) < 1.1
    assert set(axes) == {0, 1} and abs(axes[0] / kinds["rot90"] - 0.5) < 0.02
    angles = np.array([d[3] for d in draws if d[0] == "rotate"])
    assert angles.min() >= -20 and angles.max() < 20 and abs(angles.mean()) < 0.5
    assert abs(angles.std() - 40 / math.sqrt(12)) < 0.3


@pytest.mark.parametrize("shape", [(24, 40, 40), (6, 14, 12, 10)])
@pytest.mark.parametrize("connectivity", ["full", "face"])
def test_device_components_equal_scipy_on_random_masks(shape, connectivity):
    rng = np.random.default_rng(sum(shape))
    for p in (0.2, 0.45, 0.6):  # sparse, near percolation (long, branching components), dense
        masks = rng.random(shape) < p
        masks[0] = False  # an empty mask stays empty
        got = device_largest(masks, connectivity).numpy()
        assert np.array_equal(got, largest_components(masks, connectivity)), (p, connectivity)


def test_device_components_follow_long_shapes_and_break_ties_by_raster_order():
    yy, xx = np.mgrid[:96, :96]
    r, th = np.hypot(yy - 48, xx - 48), np.arctan2(yy - 48, xx - 48)
    spiral = (np.abs(((r - 3 * th) % 12) - 6) < 2) & (r < 45)  # one arm, a long geodesic path
    spiral[0, :10] = True  # a small separate piece
    got = device_largest(spiral[None], "full").numpy()[0]
    assert np.array_equal(got, largest_components(spiral[None], "full")[0]) and not got[0, :10].any()
    ties = np.zeros((1, 10, 10), bool)
    ties[0, 6:8, 6:8] = ties[0, 1:3, 1:3] = True  # two 2x2 squares: the first in raster order stays
    kept = device_largest(ties, "full").numpy()[0]
    assert kept[1:3, 1:3].all() and not kept[6:8, 6:8].any()
    diagonal = np.zeros((1, 6, 6), bool)
    diagonal[0, [0, 1, 2], [0, 1, 2]] = diagonal[0, 5, 5] = True  # 8-connected, not 4-connected
    assert device_largest(diagonal, "full").numpy()[0].sum() == 3
    assert device_largest(diagonal, "face").numpy()[0].sum() == 1


def test_device_components_test_for_the_fixed_point_every_few_sweeps(monkeypatch):
    """Each test of the fixed point is a host sync on a GPU. Testing every SWEEPS_PER_CHECK-th
    sweep gives the same components with that many times fewer tests. The sweeps queued while
    a test's answer travels (one call) and the rounding up to a whole call are all the idle
    sweeps it costs."""
    yy, xx = np.mgrid[:96, :96]
    r, th = np.hypot(yy - 48, xx - 48), np.arctan2(yy - 48, xx - 48)
    spiral = torch.from_numpy(((np.abs(((r - 3 * th) % 12) - 6) < 2) & (r < 45))[None])
    real = components._min_neighbour

    def run(every: int):
        sweeps = []
        monkeypatch.setattr(components, "SWEEPS_PER_CHECK", every)
        monkeypatch.setattr(components, "_min_neighbour", lambda ids, c: sweeps.append(1) or real(ids, c))
        return device_largest(spiral, "full"), len(sweeps)

    each, n_each = run(1)
    # n_each: the sweeps up to the first that changes nothing (s), and the one queued behind it.
    # In calls of k: up to the first call whose last sweep is at or past s, and one more call.
    s = n_each - 1
    assert s >= 4
    for k in (2, 4):
        grouped, n_grouped = run(k)
        assert torch.equal(each, grouped)
        assert n_grouped == (math.ceil(s / k) + 1) * k, (k, n_each, n_grouped)


@pytest.mark.parametrize("shape, sigma", [((6, 128, 128), 4), ((2, 48, 48, 32), 3)])
def test_hooking_reaches_the_fixed_point_in_a_few_sweeps(shape, sigma):
    """Spreading ids one voxel per sweep (`bench/components.py`'s reference sweep, the one
    before hooking) needs about as many sweeps as a component's longest path; hooking whole
    trees onto smaller ids gets there in a handful. Both reach scipy's components (the
    bench's `measure` checks)."""
    bench = load_bench("components")
    summary = bench.measure("blobs", bench.blob_batches(shape, 1, seed=len(shape), sigma=sigma), 4, "full")
    hooked, spread = summary["hooked"]["sweeps_max"], summary["spread"]["sweeps_max"]
    assert hooked <= 8 and spread >= 4 * hooked, (hooked, spread)


@pytest.mark.slow
def test_compiled_device_components_equal_scipy():
    """The sweeps compiled into one graph (what a compiled GPU run uses; inductor's CPU code
    here) reach the same components as scipy, in 2-D (ACDC's 8-connectivity, a spiral's long
    path) and 3-D (face connectivity), and the compiled graphs are reused, not recompiled."""
    from torch._dynamo.utils import counters

    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:64, :64]
    r, th = np.hypot(yy - 32, xx - 32), np.arctan2(yy - 32, xx - 32)
    spiral = (np.abs(((r - 3 * th) % 12) - 6) < 2) & (r < 30)
    cases = [(np.stack([spiral] + [rng.random((64, 64)) < p for p in (0.2, 0.45, 0.6)]), "full"),
             (rng.random((3, 10, 12, 14)) < 0.4, "face")]
    counters.clear()
    for masks, connectivity in cases:
        for _ in range(2):  # the second call of a shape reuses its graph
            got = device_largest(masks, connectivity, _graph)
            assert np.array_equal(got.numpy(), largest_components(masks, connectivity)), connectivity
    # the start, the sweeps and the counting, per shape and connectivity
    assert counters["stats"]["unique_graphs"] == 6
    # what the loop calls: class masks and their ids, sweeps, the largest per class to labels
    g = torch.Generator().manual_seed(5)
    labels = torch.nn.functional.avg_pool2d(torch.randn(3, 4, 48, 48, generator=g), 9, 1, 4).argmax(1)
    for _ in range(2):
        assert torch.equal(components.KeepLargest(4, "full", _graph)(labels), keep_largest(labels, 4, "full"))
    assert counters["stats"]["unique_graphs"] == 9


def test_device_pseudo_label_clean_up_equals_scipy():
    g = torch.Generator().manual_seed(5)
    # smooth random maps, so the labels form blobs of several components per class
    logits = torch.nn.functional.avg_pool2d(torch.randn(6, 4, 64, 64, generator=g), 9, 1, 4)
    labels = logits.argmax(1)
    for connectivity in ("full", "face"):
        assert torch.equal(components.KeepLargest(4, connectivity)(labels), keep_largest(labels, 4, connectivity))
    assert (keep_largest(labels, 4, "full") != labels).any()  # the clean-up removed something


def test_foreach_ema_equals_the_per_tensor_formula():
    torch.manual_seed(0)
    student, teacher = build("acdc", 4), build("acdc", 4)
    student.train()
    student(torch.randn(2, 1, 32, 32))  # moves the batch-norm statistics and counters
    expected = {k: v.clone() for k, v in teacher.state_dict().items()}
    for k, s in student.state_dict().items():
        if s.dtype.is_floating_point:
            expected[k].mul_(0.99).add_(s, alpha=0.01)
        else:
            expected[k] = s.clone()
    ema_update(teacher, student, 0.99)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_auto_precision_on_a_gpu_is_bf16_where_the_card_has_it(monkeypatch):
    from buarl.config import load_config
    from buarl.engine import precision_of

    cfg = load_config("phantom", {"precision": "auto"})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_of(cfg, torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision_of(cfg, torch.device("cuda")) == "amp"


def test_auto_compile_is_cuda_graphs_on_a_single_bf16_gpu_worker_only(monkeypatch):
    from buarl.config import load_config
    from buarl.engine import compile_mode_of

    auto = load_config("phantom", {})
    assert auto.compile == "auto"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compile_mode_of(auto, torch.device("cuda")) == "reduce-overhead"
    assert compile_mode_of(auto, torch.device("cuda"), world=2) == "none"  # DDP
    assert compile_mode_of(load_config("phantom", {"precision": "fp32"}), torch.device("cuda")) == "none"
    assert compile_mode_of(auto, torch.device("cpu")) == "none"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # fp16 AMP: not measured
    assert compile_mode_of(auto, torch.device("cuda")) == "none"
    for mode in ("none", "default", "reduce-overhead"):  # an explicit mode is kept everywhere
        cfg = load_config("phantom", {"compile": mode})
        assert compile_mode_of(cfg, torch.device("cpu")) == compile_mode_of(cfg, torch.device("cuda"), 2) == mode


def test_a_cpu_run_with_the_default_config_stays_eager(acdc_phantom):
    from buarl.config import load_config
    from buarl.train import Loop, Reporter

    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "labeled": 2, "iters": 1, "pretrain_iters": 0})
    loop = Loop(cfg, Reporter(), lambda m: m)
    assert loop.engine.compile == "none" and not loop.engine.device_paths
    assert loop.teacher_forward.module.core.net is loop.teacher and loop.student.module.core is loop.core
    assert loop.bcp_batch == loop.copy_paste_batch and loop.region_loss is region_loss


def test_the_engine_puts_the_fast_twins_in_a_device_runs_step(acdc_phantom):
    """What a device run's engine prepares (here forced on the CPU): the device label
    propagation for the pseudo-labels and the one-pass augmentation, each giving what the
    plain functions give for the same draws."""
    from buarl.config import load_config
    from buarl.data import load_benchmark
    from buarl.engine import Engine

    class DevicePaths(Engine):
        def __init__(self, *args):
            super().__init__(*args)
            self.device_paths = True

    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "labeled": 2, "image_size": 32})
    data = load_benchmark(cfg)
    plain, fast = Engine(cfg, 2), DevicePaths(cfg, 2)
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.nn.functional.avg_pool2d(torch.randn(6, 4, 32, 32, generator=g), 7, 1, 3) * 9, 1)
    assert torch.equal(fast.pseudo_labels(4, True, "full")(probs), plain.pseudo_labels(4, True, "full")(probs))
    assert (plain.pseudo_labels(4, True, "full")(probs) != probs.argmax(1)).any()  # the clean-up acted
    idx = list(range(12))
    got = fast.batches(data)(idx, torch.Generator().manual_seed(3))
    want = plain.batches(data)(idx, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _unet_and_twin(batch: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A UNet with dropout off (its masks are random) and batch norm on batch statistics, an
    exact copy, and a batch whose halves differ in statistics, so that splitting it matters."""
    torch.manual_seed(0)
    net = build("acdc", 4)
    for module in net.modules():
        module.train(not isinstance(module, torch.nn.modules.dropout._DropoutNd))
    x = torch.rand(batch, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    x[batch // 2:] = 3 * x[batch // 2:] + 1
    return net, copy.deepcopy(net), x


@pytest.mark.slow
def test_a_split_forward_of_the_compiled_network_keeps_batch_norm_per_chunk():
    """The student's split forward: one call of the compiled network, its norms normalising
    each chunk apart. Each chunk is normalised by its own batch statistics, the gradients are
    those of one eager call per chunk (summed), and the running statistics are where the calls
    in a row leave them. (The split stays outside the compiled graph: compiled whole with its
    backward, inductor got the first convolution's gradient wrong, torch 2.13.)"""
    core, twin, x = _unet_and_twin(4)
    eager = torch.cat([core(part) for part in x.chunk(2)])
    eager.square().mean().backward()
    with_chunk_norms(twin)
    got = SplitForward(torch.compile(twin, dynamic=False), norms_of(twin))(x, 2)
    got.square().mean().backward()
    # inductor sums in its own order: float32 rounding relative to the outputs' scale (its
    # CPU code differs from CPU to CPU)
    assert torch.allclose(got, eager, atol=1e-5 * float(eager.abs().max()), rtol=1e-4)
    scale = max(p.grad.abs().max() for p in core.parameters())
    for (name, a), b in zip(core.named_parameters(), twin.parameters()):
        assert torch.allclose(b.grad, a.grad, atol=1e-3 * scale, rtol=0), name
    for (name, a), b in zip(core.named_buffers(), twin.buffers()):
        assert torch.allclose(b.float(), a.float(), atol=1e-6, rtol=1e-5), name
    assert not torch.allclose(core(x), eager, atol=1e-2)  # one batch normalises otherwise


@pytest.mark.slow
def test_the_teachers_compiled_split_forward_equals_one_call_per_chunk():
    """The teacher (no backward, train mode as BCP's) sees its four chunks (two batches, two
    halves each) in one call of its compiled network: the probabilities of one eager call per
    chunk, and the running statistics after the four calls' batch-norm updates."""
    teacher, twin, x = _unet_and_twin(8)
    with torch.no_grad():
        eager = torch.cat([teacher(part) for part in x.chunk(4)])
        with_chunk_norms(twin)
        got = SplitForward(torch.compile(twin, dynamic=False), norms_of(twin))(x, 4)
    assert torch.allclose(got, eager, atol=1e-5, rtol=1e-4)
    for (name, a), b in zip(teacher.named_buffers(), twin.buffers()):
        assert torch.allclose(b.float(), a.float(), atol=1e-6, rtol=1e-5), name


def test_a_loss_of_parts_is_the_sum_of_the_parts_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    weight = torch.rand(4, 8, 8, generator=g)
    source = (torch.rand(4, 8, 8, generator=g) > 0.5).float()
    halves = region_loss(logits[:2], target[:2], weight[:2], source[:2]) + \
        region_loss(logits[2:], target[2:], weight[2:], source[2:])
    assert torch.equal(region_loss(logits, target, weight, source, parts=2), halves)
    assert not torch.allclose(region_loss(logits, target, weight, source), halves)


@pytest.mark.slow
def test_the_compiled_copy_paste_batch_equals_the_eager_one(acdc_phantom):
    """`Loop.bcp_batch` (`copy_paste_batch` compiled: mixing, entropy, URL/CRL weights and their stats in one
    graph) gives exactly the eager tensors, and a schedule that changes per step (tau_u
    ramped from tau_u_start, the CRL ramp) reuses the graph instead of recompiling it."""
    from torch._dynamo.utils import counters

    from buarl.config import load_config
    from buarl.method.mixing import box_mask
    from buarl.train import Loop, Reporter

    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "labeled": 2, "base": "bcp", "url": True,
                                  "crl": True, "pretrain_iters": 0, "iters": 100, "rampup_iters": 50,
                                  "tau_u_start": 0.9, "precision": "fp32", "compile": "default"})
    loop = Loop(cfg, Reporter(), lambda m: m)
    g = torch.Generator().manual_seed(0)
    x_l, x_u = torch.rand(4, 1, 48, 48, generator=g), torch.rand(4, 1, 48, 48, generator=g)
    y_l = torch.randint(0, 4, (4, 48, 48), generator=g)
    p_u, p_l = (torch.softmax(3 * torch.randn(4, 4, 48, 48, generator=g), 1) for _ in range(2))
    m = box_mask((48, 48), 2 / 3, g)
    counters.clear()
    for t in (0, 20, 60):
        schedule = loop.schedule(t)
        want = loop.copy_paste_batch(x_l, y_l, x_u, p_u, p_l, p_u.argmax(1), m, schedule)
        got = loop.bcp_batch(x_l, y_l, x_u, p_u, p_l, p_u.argmax(1), m, schedule)
        for a, b in zip(got[:4], want[:4]):
            assert a.dtype == b.dtype and torch.equal(a, b), t
        assert got[4] is None and want[4] is None  # URL's own term region: url_mode=term only
        assert {k: v.item() for k, v in got[5].items()} == {k: v.item() for k, v in want[5].items()}
    assert counters["stats"]["unique_graphs"] == 1
    assert len({tuple(loop.schedule(t).tolist()) for t in (0, 20, 60)}) == 3  # three values, one graph


@pytest.mark.slow
def test_compiled_training_follows_the_eager_loop(acdc_phantom):
    """`compile` changes how the forwards run, not what they compute: the same seed gives the
    same losses (to float rounding: inductor fuses ops) through pre-training and BUARL
    self-training, and the checkpoint keys are the plain module's. Inductor draws dropout
    masks from its own generator; `fallback_random` makes it use eager's, so the two runs
    see the same masks. Pre-training matches to 1e-4; self-training's pseudo-labels and
    uncertainty regions are thresholds, where a rounding difference can flip a pixel."""
    import torch._inductor.config as inductor

    from buarl.config import load_config
    from buarl.train import Loop, Reporter

    class Losses(Reporter):
        def __init__(self):
            self.losses, self.state = [], None

        def log(self, step, scalars):
            self.losses.append(scalars["loss"])

        def finish(self, metrics, best_weights):
            self.state = best_weights

    runs = {}
    # inductor's own patch: monkeypatch's undo deleted the setting from the config module, and
    # every later torch.export in the session failed ("fallback_random does not exist")
    with inductor.patch(fallback_random=True):
        for mode in ("none", "default"):
            cfg = load_config("phantom", {"data_root": str(acdc_phantom), "labeled": 2, "base": "bcp", "url": True,
                                          "crl": True, "pretrain_iters": 2, "iters": 3, "eval_every": 2,
                                          "log_every": 1, "precision": "fp32", "compile": mode, "test_cases": 1,
                                          "val_cases": 1})
            rep = Losses()
            loop = Loop(cfg, rep, lambda m: m)
            loop.run()
            runs[mode] = (rep.losses, rep.state, loop)
    eager, comp = runs["none"], runs["default"]
    assert len(eager[0]) == 5
    assert comp[0][:3] == pytest.approx(eager[0][:3], rel=1e-4, abs=1e-6)
    assert comp[0] == pytest.approx(eager[0], rel=1e-3, abs=1e-6)
    assert set(comp[1]) == set(eager[1]) and not any("_orig_mod" in k for k in comp[1])
    # the compiled path was the one taken, and it runs the teacher the EMA updates
    teacher, student = comp[2].teacher_forward.module.core, comp[2].student.module.core
    assert teacher._orig_mod.net is comp[2].teacher and student._orig_mod is comp[2].core
    assert eager[2].teacher_forward.module.core.net is eager[2].teacher
    assert eager[2].region_loss is region_loss and comp[2].region_loss is not region_loss
    assert comp[2].bcp_batch != comp[2].copy_paste_batch
