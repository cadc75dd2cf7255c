"""`buarl export` and `buarl predict` (issue 13): a model folder from a run or from a sweep's
best-by-validation trial, and segmentation of new scans in NIfTI / h5 / npy."""
import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from buarl.checkpoint import save_best
from orchestrator.cli import main
from buarl.config import load_config
from buarl.data import load_benchmark
from buarl.inference import predict, predict_volume
from buarl.model_folder import load_model, write_model
from buarl.nets import build
from tests.conftest import mlflow_store

AFFINE = np.array([[0.0, 1.4, 0, -10], [1.3, 0, 0, 5], [0, 0, 10.0, 2], [0, 0, 0, 1]])


def _model_folder(root, out, config="phantom"):
    """A model folder with seeded random weights whose predictions are not all background."""
    cfg = load_config(config, {"data_root": str(root), "base": "supervised", "labeled": 1, "precision": "fp32"})
    torch.manual_seed(3)
    model = build(cfg.dataset, cfg.num_classes)
    with torch.no_grad():  # a bias that makes each class win somewhere
        model.state_dict()[[k for k in model.state_dict() if k.endswith("bias")][-1]].copy_(
            torch.linspace(-0.05, 0.05, cfg.num_classes))
    write_model(out, model.state_dict(), cfg, {"best_val_dice": 0.5, "best_step": 10, "dice": 0.4}, {"source": "test"})
    return out, cfg


@pytest.fixture
def acdc_model(acdc_phantom, tmp_path):
    return _model_folder(acdc_phantom, tmp_path / "model")


def test_nifti_prediction_equals_the_evaluation_protocol_voxel_for_voxel(acdc_phantom, acdc_model, tmp_path):
    folder, cfg = acdc_model
    case = load_benchmark(cfg).test[0]
    # ACDC's own NIfTI stores (x, y, z); SSL4MIS made the h5 volumes with SimpleITK, whose
    # arrays are (z, y, x): the NIfTI holds the benchmark volume's axes reversed
    nib.save(nib.Nifti1Image(case.image.transpose(2, 1, 0), AFFINE), str(tmp_path / "scan.nii.gz"))
    assert main(["predict", "--model", str(folder), "--input", str(tmp_path / "scan.nii.gz"),
                 "--out", str(tmp_path / "pred"), "--uncertainty"]) == 0
    out = nib.load(str(tmp_path / "pred" / "scan.nii.gz"))
    model, _ = load_model(folder)
    expected = predict(model, case, cfg, torch.device("cpu"))
    labels = np.asarray(out.dataobj)
    assert labels.dtype == np.uint8 and labels.shape == case.image.transpose(2, 1, 0).shape
    assert np.array_equal(labels.transpose(2, 1, 0), expected)
    assert len(np.unique(expected)) > 1, "the test needs a prediction that is not all one class"
    # the model saw the benchmark volume itself, in its axis order (the case is not square in-plane)
    from buarl.volume_io import read_scan
    assert case.image.shape[1] != case.image.shape[2]
    seen = read_scan(tmp_path / "scan.nii.gz", cfg).image
    lo, hi = case.image.min(), case.image.max()
    assert seen.shape == case.image.shape and np.allclose(seen, (case.image - lo) / (hi - lo), atol=1e-6)
    assert np.allclose(out.affine, AFFINE)
    u = np.asarray(nib.load(str(tmp_path / "pred" / "scan_uncertainty.nii.gz")).dataobj)
    assert u.shape == labels.shape and u.dtype == np.float32 and 0 <= u.min() and u.max() <= 1

    # a 4-D file of one frame, (x, y, z, 1), is that volume: the same labels, in its own shape
    nib.save(nib.Nifti1Image(case.image.transpose(2, 1, 0)[..., None], AFFINE), str(tmp_path / "frame.nii.gz"))
    assert main(["predict", "--model", str(folder), "--input", str(tmp_path / "frame.nii.gz"),
                 "--out", str(tmp_path / "pred")]) == 0
    one = np.asarray(nib.load(str(tmp_path / "pred" / "frame.nii.gz")).dataobj)
    assert one.shape == labels.shape + (1,) and np.array_equal(one[..., 0], labels)


def test_h5_and_npy_inputs_keep_the_benchmark_layout(acdc_phantom, acdc_model, tmp_path):
    folder, cfg = acdc_model
    case = load_benchmark(cfg).test[0]
    src = next((acdc_phantom / "data").glob(f"{case.name}.h5"))
    np.save(tmp_path / "vol.npy", case.image)
    assert main(["predict", "--model", str(folder), "--input", str(src), str(tmp_path / "vol.npy"),
                 "--out", str(tmp_path / "pred")]) == 0
    model, _ = load_model(folder)
    expected = predict(model, case, cfg, torch.device("cpu"))
    with h5py.File(tmp_path / "pred" / src.name) as f:
        assert np.array_equal(f["label"][()], expected)
    assert np.array_equal(np.load(tmp_path / "pred" / "vol.npy"), expected)


def test_la_nifti_keeps_shape_and_affine(la_phantom, tmp_path):
    folder, cfg = _model_folder(la_phantom, tmp_path / "model", "phantom_la")
    case = load_benchmark(cfg).test[0]
    nib.save(nib.Nifti1Image(case.image * 50 + 200, AFFINE), str(tmp_path / "la.nii"))  # raw intensities
    assert main(["predict", "--model", str(folder), "--input", str(tmp_path / "la.nii"), "--out", str(tmp_path / "p")]) == 0
    out = nib.load(str(tmp_path / "p" / "la.nii"))
    assert out.shape == case.image.shape and np.allclose(out.affine, AFFINE)
    model, _ = load_model(folder)
    # z-scored back to the benchmark's intensities (up to float rounding)
    expected = predict_volume(model, case.image, cfg, torch.device("cpu"))
    assert (np.asarray(out.dataobj) == expected).mean() > 0.999


def test_bad_inputs_one_line_exit_2_and_the_rest_written(acdc_phantom, acdc_model, tmp_path, capsys):
    folder, cfg = acdc_model
    case = load_benchmark(cfg).test[0]
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(case.image.transpose(2, 1, 0), AFFINE), str(good))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(good.read_bytes()[:200])
    capsys.readouterr()
    assert main(["predict", "--model", str(folder), "--input", str(corrupt), str(good), "--out", str(tmp_path / "p")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "corrupt" in ln]
    assert len(err) == 1 and str(corrupt) in err[0] and "not a readable .nii.gz file" in err[0]
    assert (tmp_path / "p" / "good.nii.gz").exists() and not (tmp_path / "p" / "corrupt.nii.gz").exists()

    # a 4-D cine file cannot fit a slice-wise model
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 2), np.float32), AFFINE), str(tmp_path / "cine.nii"))
    assert main(["predict", "--model", str(folder), "--input", str(tmp_path / "cine.nii"), "--out", str(tmp_path / "q")]) == 2
    assert "cannot fit a 2-D slice-wise ACDC model" in capsys.readouterr().err

    # a folder that is not a model
    assert main(["predict", "--model", str(tmp_path), "--input", str(good), "--out", str(tmp_path / "r")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"buarl: error: --model {tmp_path}: not a buarl model folder, model.pt and config.yaml missing"]


def test_existing_outputs_are_kept_without_overwrite(acdc_phantom, acdc_model, tmp_path, capsys):
    folder, cfg = acdc_model
    src = next((acdc_phantom / "data").glob("*.h5"))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / src.name).write_text("keep me")
    assert main(["predict", "--model", str(folder), "--input", str(src), "--out", str(tmp_path / "p")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (tmp_path / "p" / src.name).read_text() == "keep me"
    assert main(["predict", "--model", str(folder), "--input", str(src), "--out", str(tmp_path / "p"), "--overwrite"]) == 0
    assert h5py.is_hdf5(tmp_path / "p" / src.name)


@pytest.mark.slow
def test_export_a_train_folder(acdc_phantom, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--config", "phantom", "--data-root", str(acdc_phantom), "--out", str(run),
                 "--set", "pretrain_iters=2", "iters=4", "eval_every=2"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "model")]) == 0
    card = (tmp_path / "model" / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"Dice {metrics['dice']:.4f}" in card and "2 labeled patients" in card and str(run.resolve()) in card
    model, cfg = load_model(tmp_path / "model")
    weights = torch.load(run / "best.pt", weights_only=True)["weights"]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "model")]) == 2  # not overwritten


def test_export_picks_the_best_trial_by_validation_not_test(acdc_phantom, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("thresholds", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"buarl.role": "sweep", "buarl.code_version": "v-test"}).info.run_id
    client.log_param(parent, "command", "orchestrator/sweep.py --space thresholds.yaml")
    client.log_param(parent, "metric", "best_val_dice")
    client.log_param(parent, "mode", "max")
    cfg = load_config("phantom", {"data_root": str(acdc_phantom)})
    trials = {"val_best": (0.8, 0.5, "FINISHED"), "test_best": (0.6, 0.9, "FINISHED"),
              "running": (0.95, 0.95, "RUNNING"), "other_point": (0.99, 0.1, "FINISHED")}
    ids = {}
    for name, (val, test, status) in trials.items():
        point = "labeled=3_seed=1" if name != "other_point" else "labeled=7_seed=1"
        run = client.create_run(exp, tags={"buarl.role": "trial", "mlflow.parentRunId": parent,
                                           "buarl.grid_point": point}).info.run_id
        client.log_metric(run, "best_val_dice", val)
        client.log_metric(run, "test_dice", test)
        torch.manual_seed(len(ids))
        d = tmp_path / name
        d.mkdir()
        save_best(d / "best.pt", build("acdc", 4).state_dict(), cfg, 10, val)
        (d / "metrics.json").write_text(json.dumps({"best_val_dice": val, "dice": test, "best_step": 10}))
        client.log_artifact(run, str(d / "best.pt"))
        client.log_artifact(run, str(d / "metrics.json"))
        client.set_terminated(run, status)
        ids[name] = run
    mlflow.set_tracking_uri(None)
    out = tmp_path / "exported"
    assert main(["export", "--experiment", "thresholds", "--grid-point", "labeled=3*", "--tracking-uri", uri,
                 "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert ids["val_best"] in card and "best_val_dice (max) among 2 finished trial(s)" in card
    assert "v-test" in card and "orchestrator/sweep.py --space thresholds.yaml" in card
    model, _ = load_model(out)
    expected = torch.load(tmp_path / "val_best" / "best.pt", weights_only=True)["weights"]
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert main(["export", "--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "x")]) == 2
    shutil.rmtree(out)


def test_a_phantom_model_says_so_in_its_card_and_at_every_predict(acdc_phantom, tmp_path, capsys):
    from buarl.data import origin
    folder, cfg = _model_folder(acdc_phantom, tmp_path / "model")
    card = (folder / "README.md").read_text()
    assert card.startswith("# buarl model: ACDC phantom,") and "**Synthetic data.**" in card
    case = load_benchmark(cfg).test[0]
    nib.save(nib.Nifti1Image(case.image.transpose(2, 1, 0), AFFINE), str(tmp_path / "scan.nii.gz"))
    for out in ("p1", "p2"):
        capsys.readouterr()
        assert main(["predict", "--model", str(folder), "--input", str(tmp_path / "scan.nii.gz"),
                     "--out", str(tmp_path / out)]) == 0
        warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
        assert len(warnings) == 1 and "synthetic phantom" in warnings[0] and str(folder) in warnings[0]
    # the same weights from real data (a root without the phantom's marker): no warning, no marker
    real = tmp_path / "real"
    shutil.copytree(acdc_phantom, real)
    (real / "PHANTOM.json").unlink()
    real_origin = origin(cfg.model_copy(update={"data_root": str(real)}))
    assert (real_origin["name"], real_origin["synthetic"]) == ("ACDC", False)
    assert real_origin["digest"] == origin(cfg)["digest"]  # the same case lists
    folder2, _ = _model_folder(real, tmp_path / "model2")
    assert (folder2 / "README.md").read_text().startswith("# buarl model: ACDC, ")
    capsys.readouterr()
    assert main(["predict", "--model", str(folder2), "--input", str(tmp_path / "scan.nii.gz"),
                 "--out", str(tmp_path / "p3")]) == 0
    assert "warning" not in capsys.readouterr().err
