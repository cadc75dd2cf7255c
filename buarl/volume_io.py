"""Scan files in and label maps out, for `buarl predict`: NIfTI, h5 in the benchmark
layouts, and .npy. Every problem is an `InputError` naming the file.

Axes: a NIfTI is read as the scanner stores it, (x, y, z). A 2-D (ACDC-kind) model segments
slices in the order the SSL4MIS h5 files were made with SimpleITK, (z, y, x): the volume
goes to the model that way and its labels come back to (x, y, z). A model trained on a
prepared dataset (`buarl prepare`) slices along the coarsest spacing, as prepare did. h5 and
.npy files are taken in the benchmark layouts: ACDC (slices, H, W), LA (X, Y, Z); a single
2-D array is one ACDC slice; several channels come first.

Channels: a model of C > 1 channels takes each case as nnU-Net names its files,
`CASE_0000.nii.gz` ... `CASE_000{C-1}.nii.gz` (grouped, the output named `CASE.nii.gz`), or
as one 4-D NIfTI with the channels last (the Decathlon's). A one-channel model's
`CASE_0000.nii.gz` also writes `CASE.nii.gz`, as nnU-Net does.

Intensities: the benchmark h5 files hold preprocessed images and are used as they are;
NIfTI and .npy inputs are normalised as the training data was: a prepared dataset's scheme
per channel (its dataset.yaml, kept in the model's config), else the benchmark's, ACDC
min-max to [0, 1] per volume (SSL4MIS), LA z-score per volume (UA-MT).
"""
from __future__ import annotations

import re
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


CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def case_and_channel(path: Path) -> tuple[str, int] | None:
    """nnU-Net's file naming: CASE_XXXX.nii.gz -> (CASE, XXXX); None for another name."""
    m = CHANNEL.match(stem(path))
    return (m["case"], int(m["channel"])) if m else None


@dataclass
class ScanFiles:
    """One case to segment: its name (of the outputs), its files (one per channel, or one)."""
    name: str
    files: list[Path]

    @property
    def kind(self) -> str:
        return kind_of(self.files[0])

    @property
    def path(self) -> Path:
        return self.files[0]


def group_inputs(paths: list[Path], channels: int) -> list[ScanFiles]:
    """The scans in `paths`: NIfTI files named CASE_XXXX with XXXX a channel of the model
    (0 .. channels - 1) are one case per folder and CASE; every other file is its own scan.
    A case that misses a channel is an InputError naming the files it lacks."""
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    order: list[tuple[Path, str] | Path] = []
    for path in paths:
        parsed = case_and_channel(path) if kind_of(path) in (".nii", ".nii.gz") else None
        if parsed and parsed[1] < channels:
            key = (path.parent, parsed[0])
            if key not in groups:
                groups[key] = {}
                order.append(key)
            groups[key][parsed[1]] = path
        else:
            order.append(path)
    scans = []
    for item in order:
        if isinstance(item, Path):
            scans.append(ScanFiles(stem(item), [item]))
            continue
        (folder, case), files = item, groups[item]
        missing = [c for c in range(channels) if c not in files]
        if missing:
            ending = kind_of(next(iter(files.values())))
            raise InputError(f"{folder}: case {case} misses channel file(s) "
                             f"{', '.join(f'{case}_{c:04d}{ending}' for c in missing)} (the model takes {channels})")
        scans.append(ScanFiles(case, [files[c] for c in range(channels)]))
    return scans


@dataclass
class Scan:
    path: Path
    image: np.ndarray          # in the model's layout, normalised; (C, ...) with several channels
    kind: str
    name: str                  # of the outputs: the file's stem, or the case of its channel files
    meta: dict[str, Any] = field(default_factory=dict)  # what writing back needs (NIfTI header)


def _benchmark_normalise(image: np.ndarray, dataset: str) -> np.ndarray:
    image = image.astype(np.float32)
    if dataset == "acdc":
        lo, hi = float(image.min()), float(image.max())
        return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    std = float(image.std())
    return (image - image.mean()) / std if std > 0 else np.zeros_like(image)


def normalise(image: np.ndarray, cfg) -> np.ndarray:
    """image (C, ...) as the model's training data was normalised."""
    if cfg.normalisation:
        from buarl.prepare import normalise as prepared
        return prepared(image, [n.model_dump() for n in cfg.normalisation])
    return np.stack([_benchmark_normalise(channel, cfg.dataset) for channel in image])


def _check_axes(path: Path, image: np.ndarray, dataset: str, channels: int) -> np.ndarray:
    """image as (C, slices or X, H or Y, W or Z), C the model's channels; a one-channel
    array may omit the channel axis, and an ACDC model takes a single 2-D slice."""
    if channels == 1 and image.ndim in (2, 3):
        image = image[None]
    if dataset == "acdc" and image.ndim == 3:
        image = image[:, None]
    if image.ndim != 4:
        raise InputError(f"{path}: shape {image.shape} cannot fit a {'2-D slice-wise ACDC' if dataset == 'acdc' else '3-D LA'}"
                         f" model: expected {f'{channels} channels first and ' if channels > 1 else ''}a 3-D volume"
                         f"{' or one 2-D slice' if dataset == 'acdc' else ''}")
    if image.shape[0] != channels:
        raise InputError(f"{path}: {image.shape[0]} channel(s), the model takes {channels} (name a case's files "
                         "CASE_0000, CASE_0001, ... or give one 4-D NIfTI with the channels last)")
    if min(image.shape) < 1 or (dataset == "acdc" and min(image.shape[2:]) < 2):
        raise InputError(f"{path}: shape {image.shape[1:]} has an empty or one-pixel axis")
    if not np.isfinite(image).all():
        raise InputError(f"{path}: image contains NaN or inf values")
    return image


def _slicing_axis(cfg, zooms) -> int:
    """The NIfTI axis a 2-D model's slices run along: z for the benchmark (SSL4MIS), the
    coarsest spacing for a prepared dataset (as `buarl prepare` cut its training slices)."""
    if not cfg.normalisation:
        return 2
    from buarl.prepare import slice_axis
    return slice_axis(tuple(zooms))


def _read_nifti(files: list[Path], cfg) -> tuple[np.ndarray, dict]:
    """(C, x, y, z) from one file per channel, or from one 4-D file with the channels last
    (a 2-D file is one slice, z of size 1)."""
    import nibabel as nib
    arrays, meta = [], {}
    for f in files:
        img = nib.load(str(f))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if not meta:
            meta = {"affine": img.affine, "header": img.header, "shape": data.shape,
                    "zooms": tuple(float(z) for z in img.header.get_zooms()[:3])}
        elif not np.allclose(img.affine, meta["affine"], atol=1e-3):
            raise InputError(f"{f}: affine differs from {files[0].name}'s")
        if data.ndim == 4 and data.shape[3] == 1:  # one frame of a 4-D (cine) layout: a volume
            data = data[..., 0]
        if data.ndim == 2:
            data = data[..., None]
        if data.ndim == 4 and cfg.in_channels == 1:
            kind = "2-D slice-wise ACDC" if cfg.dataset == "acdc" else "3-D LA"
            raise InputError(f"{f}: shape {data.shape} cannot fit a {kind} model of one channel: a 4-D cine NIfTI "
                             "holds several frames, split it into 3-D volumes first")
        if data.ndim == 4 and len(files) == 1:  # the Decathlon's channels, last
            arrays += [data[..., c] for c in range(data.shape[3])]
            meta["shape"] = data.shape[:3]
            continue
        if data.ndim != 3 or (arrays and data.shape != arrays[0].shape):
            raise InputError(f"{f}: shape {data.shape}, expected a 3-D volume"
                             + (f" of {files[0].name}'s shape {arrays[0].shape}" if arrays else ""))
        arrays.append(data)
    return np.stack(arrays), meta


def read_scan(scan: ScanFiles | Path, cfg) -> Scan:
    """One scan (or one case's channel files) in the model's layout, normalised as its
    training data."""
    if isinstance(scan, Path):
        scan = ScanFiles(stem(scan), [scan])
    path, kind, dataset = scan.path, scan.kind, cfg.dataset
    for f in scan.files:
        if not f.is_file():
            raise InputError(f"{f}: no such file")
    try:
        if kind in (".nii", ".nii.gz"):
            data, meta = _read_nifti(scan.files, cfg)
            image = _check_axes(path, data, dataset, cfg.in_channels)
            if dataset == "acdc":
                from buarl.prepare import to_slices_first
                axis = meta["axis"] = _slicing_axis(cfg, meta["zooms"])
                image = np.stack([to_slices_first(channel, axis) for channel in image])
            image = normalise(image, cfg)
        elif kind == ".h5":
            import h5py
            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise InputError(f"{path}: no 'image' dataset (found {sorted(f.keys())})")
                data = np.asarray(f["image"][()], dtype=np.float32)
            meta = {"shape": data.shape[1:] if cfg.in_channels > 1 else data.shape}
            image = _check_axes(path, data, dataset, cfg.in_channels)
        else:
            data = np.load(path, allow_pickle=False).astype(np.float32)
            meta = {"shape": data.shape[1:] if cfg.in_channels > 1 else data.shape}
            image = normalise(_check_axes(path, data, dataset, cfg.in_channels), cfg)
    except InputError:
        raise
    except Exception as e:  # a corrupt or truncated file of any format: name it and go on
        raise InputError(f"{path}: not a readable {kind} file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return Scan(path, image if cfg.in_channels > 1 else image[0], kind, scan.name, meta)


def _to_input_layout(scan: Scan, array: np.ndarray, dataset: str) -> np.ndarray:
    if "axis" in scan.meta:  # back from (slices, H, W) to the NIfTI's (x, y, z)
        axis = scan.meta["axis"]
        others = [a for a in range(3) if a != axis]
        array = np.transpose(array, np.argsort([axis] + others[::-1]))
    return array.reshape(scan.meta["shape"])


def outputs_for(scan: ScanFiles, out: Path, uncertainty: bool) -> list[Path]:
    kind, name = scan.kind, scan.name
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
    files = outputs_for(ScanFiles(scan.name, [scan.path]), out, entropy is not None)
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
