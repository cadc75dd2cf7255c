"""Scan files in and label maps out, for `buarl predict`: NIfTI, h5 in the benchmark
layouts, and .npy. Every problem is an `InputError` naming the file.

Axes: a NIfTI is read as the scanner stores it, (x, y, z); an ACDC model segments its
z-slices, so the volume goes to the model as (z, x, y) and comes back. h5 and .npy files are
taken in the benchmark layouts: ACDC (slices, H, W), LA (X, Y, Z); a single 2-D array is one
ACDC slice.

Intensities: the benchmark h5 files hold preprocessed images and are used as they are;
NIfTI and .npy inputs are normalised the way the benchmarks were made: ACDC min-max to
[0, 1] per volume (SSL4MIS), LA z-score per volume (UA-MT).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from buarl.errors import BuarlError

SUFFIXES = (".nii.gz", ".nii", ".h5", ".npy")


class InputError(BuarlError):
    pass


def kind_of(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"{path}: unknown file type (expected {', '.join(SUFFIXES)})")


def stem(path: Path) -> str:
    return path.name[: -len(kind_of(path))]


@dataclass
class Scan:
    path: Path
    image: np.ndarray          # in the model's layout, normalised
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)  # what writing back needs (NIfTI header)


def normalise(image: np.ndarray, dataset: str) -> np.ndarray:
    image = image.astype(np.float32)
    if dataset == "acdc":
        lo, hi = float(image.min()), float(image.max())
        return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    std = float(image.std())
    return (image - image.mean()) / std if std > 0 else np.zeros_like(image)


def _check_axes(path: Path, image: np.ndarray, dataset: str) -> np.ndarray:
    if dataset == "acdc" and image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        hint = " (a 4-D cine NIfTI holds several frames: split it into 3-D volumes first)" if image.ndim == 4 else ""
        raise InputError(f"{path}: shape {image.shape} cannot fit a {'2-D slice-wise ACDC' if dataset == 'acdc' else '3-D LA'}"
                         f" model: expected a 3-D volume{' or one 2-D slice' if dataset == 'acdc' else ''}{hint}")
    if min(image.shape) < 1 or (dataset == "acdc" and min(image.shape[1:]) < 2):
        raise InputError(f"{path}: shape {image.shape} has an empty or one-pixel axis")
    if not np.isfinite(image).all():
        raise InputError(f"{path}: image contains NaN or inf values")
    return image


def read_scan(path: Path, dataset: str) -> Scan:
    path = Path(path)
    kind = kind_of(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        if kind in (".nii", ".nii.gz"):
            import nibabel as nib
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
            meta = {"affine": img.affine, "header": img.header, "shape": data.shape}
            if data.ndim == 4 and data.shape[3] == 1:  # one frame of a 4-D (cine) layout: a volume
                data = data[..., 0]
            if dataset == "acdc" and data.ndim == 3:
                data = np.moveaxis(data, -1, 0)  # (x, y, z) -> z-slices
            image = normalise(_check_axes(path, data, dataset), dataset)
        elif kind == ".h5":
            import h5py
            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise InputError(f"{path}: no 'image' dataset (found {sorted(f.keys())})")
                data = np.asarray(f["image"][()], dtype=np.float32)
            meta = {"shape": data.shape}
            image = _check_axes(path, data, dataset)
        else:
            data = np.load(path, allow_pickle=False).astype(np.float32)
            meta = {"shape": data.shape}
            image = normalise(_check_axes(path, data, dataset), dataset)
    except InputError:
        raise
    except Exception as e:  # a corrupt or truncated file of any format: name it and go on
        raise InputError(f"{path}: not a readable {kind} file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return Scan(path, image, kind, meta)


def _to_input_layout(scan: Scan, array: np.ndarray, dataset: str) -> np.ndarray:
    if scan.kind in (".nii", ".nii.gz") and dataset == "acdc" and len(scan.meta["shape"]) >= 3:
        array = np.moveaxis(array, 0, -1)
    return array.reshape(scan.meta["shape"])


def outputs_for(scan_path: Path, out: Path, uncertainty: bool) -> list[Path]:
    kind, name = kind_of(scan_path), stem(scan_path)
    files = [out / f"{name}{kind}"]
    if uncertainty and kind != ".h5":  # h5 keeps both in one file
        files.append(out / f"{name}_uncertainty{kind}")
    return files


def write_prediction(scan: Scan, labels: np.ndarray, entropy: np.ndarray | None, out: Path,
                     dataset: str) -> list[Path]:
    """Write the label map (uint8) in the input's format, shape and (NIfTI) affine/header;
    with `entropy`, also the normalised entropy map (float32). Returns the files written."""
    labels = _to_input_layout(scan, labels.astype(np.uint8), dataset)
    entropy = None if entropy is None else _to_input_layout(scan, entropy.astype(np.float32), dataset)
    files = outputs_for(scan.path, out, entropy is not None)
    if scan.kind in (".nii", ".nii.gz"):
        import nibabel as nib
        header = scan.meta["header"].copy()
        header.set_data_dtype(np.uint8)
        nib.save(nib.Nifti1Image(labels, scan.meta["affine"], header), str(files[0]))
        if entropy is not None:
            header = scan.meta["header"].copy()
            header.set_data_dtype(np.float32)
            nib.save(nib.Nifti1Image(entropy, scan.meta["affine"], header), str(files[1]))
    elif scan.kind == ".h5":
        import h5py
        with h5py.File(files[0], "w") as f:
            f.create_dataset("label", data=labels, compression="gzip")
            if entropy is not None:
                f.create_dataset("uncertainty", data=entropy, compression="gzip")
    else:
        np.save(files[0], labels)
        if entropy is not None:
            np.save(files[1], entropy)
    return files
