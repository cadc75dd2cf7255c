"""Config validation, data loading, integrity errors, metrics against medpy."""
import math
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
from medpy import metric

from buarl.cli import main
from buarl.config import SECTIONS, Config, Execution, load_config, parse_overrides
from buarl.data import LOADER_FIELDS, data_key, load_benchmark
from buarl.data.acdc import labeled_slice_count
from buarl.data.sampling import TwoStreamSampler
from buarl.errors import ConfigError, DataError
from buarl.evaluate import case_metrics, dice_only, evaluate
from tests.conftest import SHARED, needs_real_data


# ---- config -----------------------------------------------------------------------------
def test_shipped_configs_validate():
    for name in ("acdc", "acdc_cpu", "la", "la_cpu", "phantom", "phantom_la"):
        cfg = load_config(name)
        assert cfg.batch_size >= cfg.labeled_bs


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["iters=100", "url=false", "tau_l=0.7", "base=mt"]) == {
        "iters": 100, "url": False, "tau_l": 0.7, "base": "mt"}


@pytest.mark.parametrize("overrides, fragment", [
    ({"tau_lx": 0.5}, "unknown key 'tau_lx'"),
    ({"tau_l": 1.5}, "key 'tau_l'"),
    ({"iters": "many"}, "key 'iters'"),
    ({"base": "fixmatch"}, "key 'base'"),
    ({"labeled_bs": 20, "batch_size": 8}, "labeled_bs=20 is larger than batch_size=8"),
    ({"mt_consistency": "mse"}, "mt_consistency=mse applies to base=mt only"),
    ({"base": "mt", "mt_consistency": "kl"}, "key 'mt_consistency'"),
])
def test_bad_config_names_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config("phantom", overrides)


def test_cli_bad_config_is_one_line_and_exit_2(capsys, tmp_path):
    code = main(["train", "--config", "phantom", "--set", "tau_u=2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tau_u" in err[0] and "Traceback" not in err[0]
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("iters: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"{bad}:2:1: not valid YAML" in capsys.readouterr().err  # file, line and column


def test_every_key_sits_in_exactly_one_section():
    keys = [k for section in SECTIONS.values() for k in section]
    assert sorted(keys) == sorted(Config.model_fields) and len(keys) == len(set(keys))
    assert set(SECTIONS["execution"]) == {"device", "precision", "compile", "threads"}
    assert {"tau_l", "tau_u", "lambda_url", "ema_decay", "crl_mode"} <= set(SECTIONS["method"])
    assert {"dataset", "labeled", "iters", "eval_every", "seed"} <= set(SECTIONS["protocol"])


def test_sectioned_and_flat_yaml_load_the_same(tmp_path):
    flat, sectioned = tmp_path / "flat.yaml", tmp_path / "sectioned.yaml"
    flat.write_text("dataset: la\ntau_l: 0.3\nlabeled_bs: 2\nbatch_size: 4\ncompile: none\n")
    sectioned.write_text("method: {tau_l: 0.3}\nprotocol: {dataset: la, labeled_bs: 2, batch_size: 4}\n"
                         "execution: {compile: none}\n")
    a, b = load_config(str(flat)), load_config(str(sectioned), {"tau_u": 0.2})
    assert b.tau_l == a.tau_l == 0.3 and b.dataset == "la" and b.compile == "none"
    assert b.to_dict() == {**a.to_dict(), "tau_u": 0.2}  # flat overrides reach sectioned files


def test_resolved_config_round_trips_through_its_sections(tmp_path):
    cfg = load_config("la_cpu", {"tau_l": 0.25, "threads": 1})
    nested = cfg.sectioned()
    assert list(nested) == ["method", "protocol", "execution"]
    assert nested["method"]["tau_l"] == 0.25 and nested["execution"]["threads"] == 1
    assert "tau_l" not in nested["protocol"] and Execution.model_fields.keys() == nested["execution"].keys()
    path = tmp_path / "config.yaml"
    path.write_text(__import__("yaml").safe_dump(nested, sort_keys=False))
    assert load_config(str(path)).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("text, fragment", [
    ("method: {lr: 0.1}\n", "key 'lr' belongs in section 'protocol', not 'method'"),
    ("tau_l: 0.2\nmethod: {tau_l: 0.3}\n", "key 'tau_l' is given twice"),
    ("execution: cpu\n", "section 'execution': expected a mapping"),
    ("protocol: {itres: 5}\n", "unknown key 'itres'"),
])
def test_misplaced_section_keys_are_named(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(str(path))


# ---- data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["phantom", "phantom_la"])
def test_data_key_covers_every_field_the_loaders_read(config, acdc_phantom, la_phantom):
    """A sweep shares one loaded dataset among the trials of equal data_key: a loader that
    read a field outside the key would hand a trial data of another setting."""
    root = acdc_phantom if config == "phantom" else la_phantom
    cfg = load_config(config, {"data_root": str(root)})
    read = set()

    class Recorder:
        def __getattr__(self, name):
            read.add(name)
            return getattr(cfg, name)
    load_benchmark(Recorder(), root)
    load_benchmark(Recorder())  # the root from the config
    assert read and read <= set(LOADER_FIELDS), read - set(LOADER_FIELDS)
    assert "data_root" in read
    # each field moves the key; the seed (or a method knob) does not
    for field, value in [("labeled", cfg.labeled + 1), ("val_cases", cfg.val_cases + 1),
                         ("test_cases", cfg.test_cases + 1), ("image_size", cfg.image_size // 2),
                         ("patch_size", [s // 2 for s in cfg.patch_size]), ("base", "supervised"), ("data_root", "/elsewhere"),
                         ("class_names", ["a", "b"]), ("in_channels", 2)]:
        assert data_key(cfg.model_copy(update={field: value})) != data_key(cfg), field
    for field, value in [("seed", cfg.seed + 1), ("tau_l", 0.2), ("base", "mt" if cfg.base != "mt" else "bcp")]:
        assert data_key(cfg.model_copy(update={field: value})) == data_key(cfg), field


def test_acdc_phantom_layout_and_split(acdc_phantom):
    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "labeled": 2})
    data = load_benchmark(cfg)
    slices = (acdc_phantom / "train_slices.list").read_text().split()
    first_two = {s.split("_")[0] for s in slices[: data.n_labeled]}
    assert len(first_two) == 2 and slices[data.n_labeled].split("_")[0] not in first_two
    assert data.images.shape[1:] == (1, 64, 64) and data.images.dtype == torch.float32
    assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
    assert len(data.labeled_idx) + len(data.unlabeled_idx) == len(slices)
    assert len(data.val) == 2 and data.val[0].image.ndim == 3
    x, y = data.batch(data.labeled_idx[:3], torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 64, 64) and y.shape == (3, 64, 64) and int(y.max()) <= 3
    sizes = {h5py.File(acdc_phantom / "data" / "slices" / f"{s}.h5")["image"].shape for s in slices}
    assert len(sizes) > 1, "phantom slices must vary in size like ACDC"


def test_la_phantom_split(la_phantom):
    cfg = load_config("phantom_la", {"data_root": str(la_phantom), "labeled": 2, "val_cases": 1})
    data = load_benchmark(cfg)
    assert (len(data.labeled_idx), len(data.unlabeled_idx), len(data.val)) == (2, 1, 1)
    x, y = data.batch([0, 1], torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 32, 32, 32) and set(torch.unique(y).tolist()) <= {0, 1}


def test_labeled_slice_count_on_phantom(acdc_phantom):
    slices = (acdc_phantom / "train_slices.list").read_text().split()
    per_patient = {}
    for s in slices:
        per_patient[s.split("_")[0]] = per_patient.get(s.split("_")[0], 0) + 1
    counts = list(per_patient.values())
    for n in (1, 2, 3):
        assert labeled_slice_count(slices, n, acdc_phantom) == sum(counts[:n])
    with pytest.raises(DataError, match="has only 4"):
        labeled_slice_count(slices, 5, acdc_phantom / "train_slices.list")


@needs_real_data
def test_labeled_slice_count_matches_reference_map():
    slices = (SHARED / "ACDC" / "train_slices.list").read_text().split()
    assert [labeled_slice_count(slices, n, SHARED) for n in (3, 7, 14, 70)] == [68, 136, 256, 1312]


def test_sampler_is_deterministic_and_keeps_streams_apart():
    a = TwoStreamSampler(list(range(5)), list(range(5, 20)), 2, 3, seed=4)
    b = TwoStreamSampler(list(range(5)), list(range(5, 20)), 2, 3, seed=4)
    seen = set()
    for _ in range(10):
        (la, ua), (lb, ub) = a.next(), b.next()
        assert la == lb and ua == ub
        assert all(i < 5 for i in la) and all(i >= 5 for i in ua)
        seen.update(la)
    assert seen == set(range(5))


def _copy(src, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def _first_slice(root):
    return root / "data" / "slices" / f"{(root / 'train_slices.list').read_text().split()[0]}.h5"


def _rewrite(path, **arrays):
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f}
    data.update(arrays)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if v is not None:
                f.create_dataset(k, data=v)


@pytest.mark.parametrize("breakage, fragment", [
    ("missing_root", "no such folder"),
    ("missing_list", "val.list: list file is missing"),
    ("missing_file", "file is missing"),
    ("escape", "points outside the data root"),
    ("no_label", "no 'label' dataset"),
    ("shape", "image shape"),
    ("label_range", "label values must be integers in [0, 3]"),
    ("nan", "NaN"),
    ("nan_label", "label contains NaN or inf values"),
    ("empty", "image is empty (shape (0, 0))"),
    ("group", "'image' is an HDF5 group, expected a numeric dataset"),
    ("string", "'image' holds"),
    ("duplicate", "is listed twice"),
])
def test_broken_data_is_refused_naming_the_file(acdc_phantom, tmp_path, breakage, fragment):
    root = _copy(acdc_phantom, tmp_path)
    first = _first_slice(root)
    if breakage == "missing_root":
        root = tmp_path / "nowhere"
    elif breakage == "missing_list":
        (root / "val.list").unlink()
    elif breakage == "missing_file":
        first.unlink()
    elif breakage == "escape":
        lst = root / "train_slices.list"
        lst.write_text("../../../etc/passwd\n" + lst.read_text())
    elif breakage == "no_label":
        _rewrite(first, label=None)
    elif breakage == "shape":
        _rewrite(first, label=np.zeros((5, 5), np.uint8))
    elif breakage == "label_range":
        img = h5py.File(first)["image"][()]
        _rewrite(first, label=np.full(img.shape, 7, np.uint8))
    elif breakage == "nan":
        img = h5py.File(first)["image"][()]
        img[0, 0] = np.nan
        _rewrite(first, image=img)
    elif breakage == "nan_label":
        img = h5py.File(first)["image"][()]
        label = np.zeros(img.shape, np.float32)
        label[0, 0] = np.nan
        _rewrite(first, label=label)
    elif breakage == "empty":
        _rewrite(first, image=np.zeros((0, 0), np.float32), label=np.zeros((0, 0), np.uint8))
    elif breakage == "group":
        label = h5py.File(first)["label"][()]
        first.unlink()
        with h5py.File(first, "w") as f:
            f.create_group("image")
            f.create_dataset("label", data=label)
    elif breakage == "string":
        _rewrite(first, image=np.array("not an image", dtype=h5py.string_dtype()))
    elif breakage == "duplicate":
        lst = root / "train_slices.list"
        lst.write_text(lst.read_text().split()[0] + "\n" + lst.read_text())
    cfg = load_config("phantom", {"data_root": str(root)})
    with pytest.raises(DataError, match=re.escape(fragment)) as e:
        load_benchmark(cfg)
    if breakage not in ("missing_root", "escape", "missing_list", "duplicate"):
        assert first.name in str(e.value)


def test_a_refused_run_leaves_no_run_folder(acdc_phantom, tmp_path, capsys):
    from buarl.cli import main
    root = _copy(acdc_phantom, tmp_path)
    _rewrite(_first_slice(root), image=np.zeros((0, 0), np.float32), label=np.zeros((0, 0), np.uint8))
    assert main(["train", "--data-root", str(root), "--out", str(tmp_path / "run")]) == 2
    assert "image is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_labeled_larger_than_training_set(acdc_phantom):
    with pytest.raises(DataError, match="labeled=9 patients"):
        load_benchmark(load_config("phantom", {"data_root": str(acdc_phantom), "labeled": 9}))


# ---- metrics -----------------------------------------------------------------------------
def _squares():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    pred = np.zeros((20, 20), bool)
    pred[7:17, 5:15] = True
    return pred, gt


def test_metrics_equal_medpy_on_overlapping_squares():
    pred, gt = _squares()
    m, empty = case_metrics(pred, gt)
    assert not empty
    assert m["dice"] == pytest.approx(0.8) and m["jaccard"] == pytest.approx(80 / 120)
    assert m["hd95"] == pytest.approx(metric.binary.hd95(pred, gt))
    assert m["asd"] == pytest.approx(metric.binary.asd(pred, gt))
    assert dice_only(pred, gt) == pytest.approx(metric.binary.dc(pred, gt))


def test_empty_prediction_policies():
    _, gt = _squares()
    empty = np.zeros_like(gt)
    ref, flagged = case_metrics(empty, gt, "reference")
    assert ref == {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0} and flagged
    strict, flagged = case_metrics(empty, gt, "strict")
    assert flagged and strict["dice"] == 0 and strict["hd95"] == pytest.approx(math.sqrt(800))
    both, flagged = case_metrics(empty, empty, "strict")
    assert both == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0} and not flagged


def test_evaluate_counts_missed_structures_among_present_ones():
    """A background-only model misses every structure present; absent ones are not counted."""
    from buarl.config import Config
    from buarl.data.types import Case

    class Background(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
            logits[:, 0] = 1.0
            return logits

    full, lv_only = np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16), np.uint8)
    full[0, 2:5, 2:5], full[0, 6:9, 6:9], full[1, 10:13, 10:13] = 1, 2, 3
    lv_only[1, 4:8, 4:8] = 3
    cases = [Case("a", np.zeros((2, 16, 16), np.float32), full),
             Case("b", np.zeros((2, 16, 16), np.float32), lv_only)]
    cfg = Config(dataset="acdc", image_size=16, precision="fp32")
    m = evaluate(Background(), cases, cfg, torch.device("cpu"))
    assert (m["empty_predictions"], m["structures"], m["cases"]) == (4, 4, 2)
    assert m["hd95"] == 0.0  # the reference policy scores a missed structure's distances as 0


def test_code_snapshot_records_its_commit(tmp_path):
    """A run from `git archive` output (no .git) still names the commit it came from."""
    import subprocess
    import sys
    from tests.conftest import ROOT
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "buarl"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    out = subprocess.run([sys.executable, "-c", "from buarl.provenance import code_version; print(code_version())"],
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("+g" + head.stdout.strip()[:12]), out.stdout
