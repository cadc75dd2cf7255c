"""`buarl prepare`: own NIfTI datasets (nnU-Net v2 raw, Decathlon) as data roots that train."""
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from buarl.cli import main
from buarl.config import validate
from buarl.data import origin
from tests.conftest import mlflow_store

ROOT = Path(__file__).resolve().parents[1]
ACDC = ROOT.parent / "shared" / "data" / "ACDC"


def _nifti(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 10.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def _nnunet(folder: Path, cases: dict, labels: dict, channels=("MRI",), spacing=(1.5, 1.5, 10.0)) -> Path:
    """An nnU-Net v2 raw dataset: cases {name: (images per channel (X, Y, Z), label or None)}."""
    for name, (images, label) in cases.items():
        for c, image in enumerate(images):
            _nifti(folder / "imagesTr" / f"{name}_{c:04d}.nii.gz", image.astype(np.float32), spacing)
        if label is not None:
            _nifti(folder / "labelsTr" / f"{name}.nii.gz", label.astype(np.uint8), spacing)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels,
        "numTraining": len(cases), "file_ending": ".nii.gz", "name": "Blobs"}))
    return folder


def _blobs(n: int, shape=(48, 48, 6), classes=2, seed=0) -> dict:
    """Cases with a disc per class on every slice, intensity rising with the class."""
    rng = np.random.default_rng(seed)
    out = {}
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        for c in range(1, classes + 1):
            cx, cy = rng.integers(12, shape[0] - 12, 2)
            disc = (x - cx) ** 2 + (y - cy) ** 2 < (4 + 2 * c) ** 2
            label[disc] = c
        image = label * 0.4 + rng.normal(0, 0.1, shape) + 100.0  # an MR-like offset
        out[f"case_{i:03d}"] = ([image], label)
    return out


@pytest.mark.skipif(not ACDC.is_dir(), reason="needs ../shared/data/ACDC")
def test_acdc_as_nnunet_raw_prepares_to_the_same_arrays_and_the_same_run(tmp_path, capsys):
    """Real ACDC volumes written as nnU-Net v2 raw NIfTI (1.5 mm in-plane, 10 mm slices):
    the prepared slices and volumes equal the h5 ones (min-max, as the ACDC files), and a
    run on the prepared root equals a run on the same volumes in the SSL4MIS layout."""
    names = (ACDC / "val.list").read_text().split()[:6]
    volumes = {}
    for n in names:
        with h5py.File(ACDC / "data" / f"{n}.h5") as f:
            volumes[n] = (f["image"][()], f["label"][()])  # (D, H, W)
    cases = {n: ([img.transpose(2, 1, 0)], lab.transpose(2, 1, 0)) for n, (img, lab) in volumes.items()}
    cases[names[-1]] = (cases[names[-1]][0], None)  # one case without a label file: unlabeled
    src = _nnunet(tmp_path / "raw", cases, {"background": 0, "RV": 1, "Myo": 2, "LV": 3})
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--labeled", "2"]) == 0
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["dim"] == 2 and info["class_names"] == ["RV", "Myo", "LV"] and info["channels"] == ["MRI"]
    split = info["split"]
    assert len(split["labeled"]) == 2 and len(split["val"]) == len(split["test"]) == 1
    assert names[-1] in split["unlabeled"] and len(split["unlabeled"]) == 2  # one demoted, one truly unlabeled
    for n in split["val"] + split["test"]:
        with h5py.File(out / "data" / f"{n}.h5") as f:
            assert np.array_equal(f["image"][()], volumes[n][0]) and np.array_equal(f["label"][()], volumes[n][1])
    for n in split["labeled"] + split["unlabeled"]:
        for k in range(volumes[n][0].shape[0]):
            with h5py.File(out / "data" / "slices" / f"{n}_slice_{k}.h5") as f:
                assert np.array_equal(f["image"][()], volumes[n][0][k])
                assert ("label" in f) == (n in split["labeled"])  # unlabeled cases carry no label
                if n in split["labeled"]:
                    assert np.array_equal(f["label"][()], volumes[n][1][k])

    # the same volumes and split in the SSL4MIS layout, written from the h5 arrays themselves;
    # SSL4MIS groups slices by the name's first part (the patient): one per case here
    mirror = tmp_path / "ssl4mis"
    (mirror / "data" / "slices").mkdir(parents=True)
    train = split["labeled"] + split["unlabeled"]
    slices = []
    for i, n in enumerate(train):
        for k in range(volumes[n][0].shape[0]):
            slices.append(f"m{i}_{n}_slice_{k}")
            with h5py.File(mirror / "data" / "slices" / f"{slices[-1]}.h5", "w") as f:
                f["image"], f["label"] = volumes[n][0][k], volumes[n][1][k]
    for n in split["val"] + split["test"]:
        with h5py.File(mirror / "data" / f"{n}.h5", "w") as f:
            f["image"], f["label"] = volumes[n]
    (mirror / "train_slices.list").write_text("\n".join(slices) + "\n")
    for lst in ("val.list", "test.list"):
        (mirror / lst).write_text((out / lst).read_text())
    sets = ["--set", "labeled=2", "pretrain_iters=2", "iters=4", "eval_every=2", "log_every=2", "threads=1",
            "val_cases=0", "test_cases=0"]
    assert main(["train", "--data-root", str(out), "--out", str(tmp_path / "a"), *sets]) == 0
    assert main(["train", "--data-root", str(mirror), "--out", str(tmp_path / "b"), *sets]) == 0
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("a", "b"))
    assert a["dice"] == b["dice"] and a["per_class"] == b["per_class"]
    log_a, log_b = ((tmp_path / r / "train.log").read_text() for r in ("a", "b"))
    losses = [[ln.split("loss=")[1].split()[0] for ln in log.splitlines() if "loss=" in ln] for log in (log_a, log_b)]
    assert losses[0] and losses[0] == losses[1]


def test_truly_unlabeled_cases_train_with_bcp_under_the_datasets_class_names(tmp_path):
    """Cases without a label file train as unlabeled (their prepared slices hold no label,
    so a loader that read one would fail), and the metrics carry the dataset's class names."""
    cases = _blobs(6)
    for n in ("case_004", "case_005"):
        cases[n] = (cases[n][0], None)
    src = _nnunet(tmp_path / "raw", cases, {"background": 0, "lesion": 1, "organ": 2})
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out)]) == 0
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["dim"] == 2 and info["labeled_cases"] == 2 and {"case_004", "case_005"} <= set(info["split"]["unlabeled"])
    for name in (out / "train_slices.list").read_text().split():
        with h5py.File(out / "data" / "slices" / f"{name}.h5") as f:
            assert ("label" in f) == (name.rsplit("_slice_", 1)[0] in info["split"]["labeled"])
            assert 0.0 <= f["image"][()].min() and f["image"][()].max() <= 1.0  # min-max per volume
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(out), "--out", str(run), "--set", "base=bcp", "pretrain_iters=2",
                 "iters=4", "eval_every=2", "log_every=2", "threads=1"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"lesion", "organ"} and 0.0 <= metrics["dice"] <= 1.0
    assert metrics["data"]["name"] == "Blobs" and metrics["data"]["synthetic"] is False
    # a label ratio is a share of the prepared cases (train.list), not of slice-name patients
    assert metrics["data"]["train_cases"] == len((out / "train.list").read_text().split())
    # describing a run never raises: a broken dataset.yaml is the data checks' to report
    (out / "dataset.yaml").write_text("format: [")
    described = origin(validate({"data_root": str(out)}))
    assert described["name"] == "ACDC" and described["synthetic"] is False and described["root"] == str(out)
    # more labeled patients than the dataset holds: one line, exit 2
    assert main(["train", "--data-root", str(out), "--out", str(tmp_path / "x"), "--set", "labeled=3"]) == 2


def test_an_isotropic_dataset_prepares_as_volumes_and_trains_the_vnet(tmp_path):
    rng = np.random.default_rng(1)
    x, y, z = np.meshgrid(*[np.arange(s) for s in (40, 40, 36)], indexing="ij")
    cases = {}
    for i in range(5):
        c = rng.integers(14, 22, 3)
        label = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < 64).astype(np.uint8)
        cases[f"la_{i:03d}"] = ([label * 1.5 + rng.normal(0, 0.3, label.shape)], label if i < 4 else None)
    src = _nnunet(tmp_path / "raw", cases, {"background": 0, "atrium": 1}, spacing=(1.0, 1.0, 1.0))
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--mr-norm", "zscore"]) == 0
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["dim"] == 3 and info["dataset"] == "la"
    with h5py.File(out / "2018LA_Seg_Training Set" / info["split"]["val"][0] / "mri_norm2.h5") as f:
        image = f["image"][()]
        assert image.shape == (40, 40, 36) and abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-3
    run = tmp_path / "run"
    assert main(["train", "--config", "phantom_la", "--data-root", str(out), "--out", str(run),
                 "--set", "pretrain_iters=2", "iters=2", "eval_every=2", "log_every=2", "threads=1"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"atrium"}
    # the 2-D config on a 3-D root: one line naming both, exit 2
    assert main(["train", "--config", "phantom", "--data-root", str(out), "--out", str(tmp_path / "x"),
                 "--set", "dataset=acdc"]) == 2


def _raw_with(tmp_path, change) -> Path:
    cases = _blobs(4)
    src = _nnunet(tmp_path / "raw", cases, {"background": 0, "lesion": 1, "organ": 2})
    change(src)
    return src


def _affine(src):
    _nifti(src / "labelsTr" / "case_001.nii.gz", _blobs(4)["case_001"][1], spacing=(1.0, 1.5, 10.0))


def _shape(src):
    _nifti(src / "labelsTr" / "case_001.nii.gz", np.zeros((48, 40, 6), np.uint8))


def _values(src):
    _nifti(src / "labelsTr" / "case_001.nii.gz", np.full((48, 48, 6), 7, np.uint8))


def _unreadable(src):
    (src / "imagesTr" / "case_002_0000.nii.gz").write_bytes(b"not a nifti")


def _channel(src):
    meta = json.loads((src / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (src / "dataset.json").write_text(json.dumps(meta))


def _empty(src):
    for f in (src / "imagesTr").iterdir():
        f.unlink()


@pytest.mark.parametrize("change, message, args", [
    (_affine, "label affine differs", []),
    (_shape, "label shape (48, 40, 6) != image shape (48, 48, 6)", []),
    (_values, "label values [7] are not in dataset.json's labels [0, 1, 2]", []),
    (_unreadable, "case_002_0000.nii.gz: not a readable NIfTI file", []),
    (_channel, "case case_000 misses channel file(s) case_000_0001.nii.gz", []),
    (lambda src: None, "4 labeled case(s), but --val 2 + --test 1 + --labeled 2 need 5", ["--val", "2", "--labeled", "2"]),
    (_empty, "the dataset has no training cases", []),
])
def test_bad_datasets_fail_in_one_line_before_anything_is_written(tmp_path, capsys, change, message, args):
    src = _raw_with(tmp_path, change)
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_decathlon_dataset_with_four_d_images_trains_on_both_channels(tmp_path):
    """MSD: a `training` list, several modalities in one 4-D image: the root keeps the
    channels apart (C first), the loader hands both to the network, and a 2-channel UNet
    trains on them."""
    src = tmp_path / "Task01"
    cases = _blobs(5)
    entries = []
    for name, (images, label) in cases.items():
        _nifti(src / "imagesTr" / f"{name}.nii.gz", np.stack([images[0], -images[0] ** 2], -1).astype(np.float32))
        _nifti(src / "labelsTr" / f"{name}.nii.gz", label)
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    (src / "dataset.json").write_text(json.dumps({"name": "Task01", "modality": {"0": "FLAIR", "1": "T1w"},
                                                  "labels": {"0": "background", "1": "lesion", "2": "organ"},
                                                  "training": entries}))
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--labeled", "1"]) == 0
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["channels"] == ["FLAIR", "T1w"] and info["class_names"] == ["lesion", "organ"]
    with h5py.File(out / "data" / f"{info['split']['val'][0]}.h5") as f:
        assert f["image"].shape == (2, 6, 48, 48)  # (C, D, H, W)
    from buarl.cli import resolve
    from buarl.data import load_benchmark
    cfg = resolve("phantom", ["image_size=48", "labeled=1"], str(out))
    assert cfg.in_channels == 2
    data = load_benchmark(cfg)
    first = info["split"]["labeled"][0]
    with h5py.File(out / "data" / "slices" / f"{first}_slice_0.h5") as f:
        stored = f["image"][()]
    assert data.images.shape[1] == 2 and torch.equal(data.images[0], torch.from_numpy(stored))
    assert not torch.equal(data.images[:, 0], data.images[:, 1])  # two channels, not one twice
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(out), "--out", str(run), "--set", "pretrain_iters=2", "iters=2",
                 "eval_every=2", "log_every=2", "threads=1", "image_size=48", "labeled=1"]) == 0
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert best["config"]["in_channels"] == 2
    assert next(v for v in best["weights"].values() if v.dim() == 4).shape[1] == 2  # the first conv: 2 channels
    assert set(json.loads((run / "metrics.json").read_text())["per_class"]) == {"lesion", "organ"}
    # a run that says one channel on this root: one line naming both, exit 2
    assert main(["train", "--data-root", str(out), "--out", str(tmp_path / "x"), "--set", "in_channels=1", "labeled=1"]) == 2


def test_predict_with_a_prepared_model_groups_channel_files_and_prepares_them_as_training_did(tmp_path, capsys):
    """A model of a prepared CT + MR dataset (slices along x, the coarsest spacing): `predict`
    on an nnU-Net imagesTs folder groups CASE_0000 / CASE_0001 into one case, normalises each
    channel as `buarl prepare` did (CT with the dataset's statistics) and slices along the same
    axis, so its labels equal the evaluation protocol's on the prepared volume; the label map is
    CASE.nii.gz in the scan's own geometry."""
    spacing = (10.0, 1.5, 1.5)
    rng = np.random.default_rng(3)
    cases = {}
    for name, (_, disc) in _blobs(5, shape=(48, 48, 1)).items():
        label = np.stack([disc[..., 0]] * 6)  # (x, y, z): discs in the y-z plane, x the slices
        ct = label * 300.0 - 1000.0 + rng.normal(0, 20, label.shape)  # HU-like
        mr = label * 0.4 + rng.normal(0, 0.1, label.shape) + 100.0
        cases[name] = ([ct, mr], label)
    src = _nnunet(tmp_path / "raw", cases, {"background": 0, "lesion": 1, "organ": 2}, channels=("CT", "T2"),
                  spacing=spacing)
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--labeled", "1"]) == 0
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["dim"] == 2 and [n["scheme"] for n in info["normalisation"]] == ["ct", "minmax"]
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(out), "--out", str(run), "--set", "pretrain_iters=2", "iters=2",
                 "eval_every=2", "log_every=2", "threads=1", "image_size=48", "labeled=1"]) == 0
    model_dir = tmp_path / "model"
    assert main(["export", "--run", str(run), "--out", str(model_dir)]) == 0

    test_case = info["split"]["test"][0]
    ts = tmp_path / "imagesTs"
    ts.mkdir()
    for c in range(2):
        (ts / f"{test_case}_{c:04d}.nii.gz").write_bytes((src / "imagesTr" / f"{test_case}_{c:04d}.nii.gz").read_bytes())
    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), "--input", str(ts), "--out", str(tmp_path / "pred")]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"{test_case}.nii.gz"]
    written = nib.load(str(tmp_path / "pred" / f"{test_case}.nii.gz"))
    raw = nib.load(str(src / "imagesTr" / f"{test_case}_0000.nii.gz"))
    assert written.shape == raw.shape and np.allclose(written.affine, raw.affine)

    import torch as th
    from buarl.inference import predict_volume
    from buarl.model_folder import load_model
    from buarl.prepare import to_slices_first
    model, cfg = load_model(model_dir)
    assert cfg.in_channels == 2 and cfg.normalisation[0].scheme == "ct"
    with h5py.File(out / "data" / f"{test_case}.h5") as f:
        prepared = f["image"][()]  # (C, D, H, W), normalised by prepare
    expected = predict_volume(model, prepared, cfg, th.device("cpu"))
    assert np.array_equal(to_slices_first(np.asarray(written.dataobj), 0), expected)
    assert len(np.unique(expected)) > 1, "the test needs a prediction that is not all one class"

    # a case that lacks a channel: one line naming the missing file, exit 2, nothing written
    (ts / f"{test_case}_0001.nii.gz").unlink()
    assert main(["predict", "--model", str(model_dir), "--input", str(ts), "--out", str(tmp_path / "p2")]) == 2
    assert f"{test_case}_0001.nii.gz" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_a_three_d_two_channel_decathlon_model_trains_and_predicts_its_four_d_scans(tmp_path):
    """3-D with two modalities: the VNet takes both, and `predict` on a Decathlon 4-D scan
    (channels last) equals the evaluation protocol on the prepared volume (C, X, Y, Z)."""
    rng = np.random.default_rng(2)
    x, y, z = np.meshgrid(*[np.arange(s) for s in (40, 40, 36)], indexing="ij")
    src = tmp_path / "Task02"
    entries = []
    for i in range(5):
        c = rng.integers(14, 22, 3)
        label = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < 64).astype(np.uint8)
        image = np.stack([label * 1.5 + rng.normal(0, 0.3, label.shape), rng.normal(5, 2, label.shape)], -1)
        _nifti(src / "imagesTr" / f"s{i}.nii.gz", image.astype(np.float32), (1.0, 1.0, 1.0))
        _nifti(src / "labelsTr" / f"s{i}.nii.gz", label, (1.0, 1.0, 1.0))
        entries.append({"image": f"./imagesTr/s{i}.nii.gz", "label": f"./labelsTr/s{i}.nii.gz"})
    (src / "dataset.json").write_text(json.dumps({"name": "Two", "modality": {"0": "T1", "1": "T2"},
                                                  "labels": {"0": "background", "1": "atrium"}, "training": entries}))
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--labeled", "1", "--mr-norm", "zscore"]) == 0
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["dim"] == 3
    run = tmp_path / "run"
    assert main(["train", "--config", "phantom_la", "--data-root", str(out), "--out", str(run), "--set", "labeled=1",
                 "pretrain_iters=2", "iters=2", "eval_every=2", "log_every=2", "threads=1"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "model")]) == 0
    test_case = info["split"]["test"][0]
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(src / "imagesTr" / f"{test_case}.nii.gz"),
                 "--out", str(tmp_path / "pred")]) == 0
    written = np.asarray(nib.load(str(tmp_path / "pred" / f"{test_case}.nii.gz")).dataobj)
    from buarl.inference import predict_volume
    from buarl.model_folder import load_model
    model, cfg = load_model(tmp_path / "model")
    with h5py.File(out / "2018LA_Seg_Training Set" / test_case / "mri_norm2.h5") as f:
        prepared = f["image"][()]
    assert prepared.shape == (2, 40, 40, 36) and cfg.in_channels == 2
    assert written.shape == (40, 40, 36)
    assert np.array_equal(written, predict_volume(model, prepared, cfg, torch.device("cpu")))


def test_a_plain_images_and_labels_folder_prepares_with_its_named_classes(tmp_path, capsys):
    """images/ + labels/ without dataset.json: --labels names the classes; an image without a
    label is unlabeled; without --labels, one line says what to add."""
    src = tmp_path / "plain"
    for name, (images, label) in _blobs(5).items():
        _nifti(src / "images" / f"{name}.nii.gz", images[0].astype(np.float32))
        if name != "case_004":
            _nifti(src / "labels" / f"{name}.nii.gz", label)
    assert main(["prepare", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "--labels NAME=VALUE" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["prepare", str(src), "--out", str(tmp_path / "x"), "--labels", "background=0", "lesion"]) == 2
    assert "'lesion'" in capsys.readouterr().err
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--labels", "background=0", "lesion=1", "organ=2",
                 "--labeled", "1"]) == 0
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["class_names"] == ["lesion", "organ"] and info["channels"] == ["MRI"]
    assert "case_004" in info["split"]["unlabeled"] and info["labeled_cases"] == 1
    assert main(["train", "--data-root", str(out), "--out", str(tmp_path / "run"), "--set", "pretrain_iters=2",
                 "iters=2", "eval_every=2", "log_every=2", "threads=1", "labeled=1", "image_size=48"]) == 0


@pytest.mark.slow
def test_a_sweep_on_a_prepared_root_logs_the_datasets_classes_and_channels(tmp_path):
    """The issue's "done when": prepare + sweep on a dataset the project has never seen
    (nnU-Net v2 raw, two channels, cases without labels): the trial finishes, its MLflow run
    names the data and carries per-class metrics under the dataset's class names."""
    import os
    import subprocess
    import sys

    import mlflow
    cases = {n: ([im[0], -im[0] ** 2], lab if n not in ("case_004", "case_005") else None)
             for n, (im, lab) in _blobs(6).items()}
    src = _nnunet(tmp_path / "raw", cases, {"background": 0, "lesion": 1, "organ": 2}, channels=("T1", "T2"))
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--labeled", "1"]) == 0
    space = {"name": "own", "base_config": "phantom", "phantom_config": "phantom",
             "fixed": {"pretrain_iters": 2, "iters": 4, "eval_every": 2, "log_every": 2, "image_size": 48},
             "grid": {"labeled": [1]}, "search": {"tau_l": {"type": "uniform", "low": 0.1, "high": 0.9}},
             "num_samples": 1, "metric": "best_val_dice", "mode": "max"}
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(space))
    uri = mlflow_store(tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "orchestrator" / "sweep.py"), "--space", str(tmp_path / "own.yaml"),
                           "--data-root", str(out), "--tracking-uri", uri, "--storage", str(tmp_path / "ray")],
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["own"])
    trial = runs[runs["tags.buarl.role"] == "trial"]
    assert len(trial) == 1 and trial.iloc[0]["status"] == "FINISHED"
    row = trial.iloc[0]
    assert row["params.in_channels"] == "2" and row["tags.buarl.data"] == "Blobs"
    for name in ("lesion", "organ"):
        assert 0.0 <= row[f"metrics.test/dice_{name}"] <= 1.0
    assert not any(c.endswith(("_RV", "_LV", "_Myo")) for c in runs.columns)
