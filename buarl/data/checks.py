"""Integrity checks that run before any training: each names the file and the problem."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from buarl.errors import DataError


def require_root(root: Path, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root}: no such folder (expected the {what} layout)")
    return root.resolve()


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: list file is missing")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not names:
        raise DataError(f"{path}: list file is empty")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: entry {name!r} is listed twice")
        seen.add(name)
    return names


def _array(f, key: str, path: Path) -> np.ndarray:
    """The dataset `key` as an array, or one DataError naming what it is instead."""
    node = f[key]
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{path}: {key!r} is an HDF5 {type(node).__name__.lower()}, expected a numeric dataset")
    if node.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key!r} holds {node.dtype} values, expected numbers")
    return np.asarray(node[()])


def inside(root: Path, rel: str, list_file: Path) -> Path:
    """The file a list entry names, refusing entries that escape the data root."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{list_file}: entry {rel!r} points outside the data root {root}")
    return path


def _image(f, path: Path, ndim: int, channels: int) -> np.ndarray:
    """The open file's image (float32), validated: `ndim` spatial axes, behind a channel axis
    of `channels` when there are several (one channel: no channel axis, as the benchmarks)."""
    if "image" not in f:
        raise DataError(f"{path}: no 'image' dataset (found {sorted(f.keys())})")
    image = _array(f, "image", path).astype(np.float32)
    if channels > 1 and (image.ndim != ndim + 1 or image.shape[0] != channels):
        raise DataError(f"{path}: image shape {image.shape}, expected {channels} channels first and "
                        f"{ndim} spatial axes")
    if channels == 1 and image.ndim != ndim:
        raise DataError(f"{path}: image has {image.ndim} dimensions, expected {ndim}")
    if image.size == 0:
        raise DataError(f"{path}: image is empty (shape {image.shape})")
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image contains NaN or inf values")
    return image


@contextmanager
def _open(path: Path):
    """The h5 file, open; a missing, unreadable or truncated one is one DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file is missing (named by a list file)")
    try:
        with h5py.File(path, "r") as f:
            yield f
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None


def read_image(path: Path, ndim: int, channels: int = 1) -> np.ndarray:
    """image (float32) of one h5 file, validated; its label, if any, is never read (an
    unlabeled case's: a prepared root holds none)."""
    with _open(path) as f:
        return _image(f, path, ndim, channels)


def read_case(path: Path, num_classes: int, ndim: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """image (float32) and label (uint8) of one h5 file, validated, in one open."""
    with _open(path) as f:
        image = _image(f, path, ndim, channels)
        if "label" not in f:
            raise DataError(f"{path}: no 'label' dataset (found {sorted(f.keys())})")
        label = _array(f, "label", path)
    if image.shape[-ndim:] != label.shape:
        raise DataError(f"{path}: image shape {image.shape} != label shape {label.shape}")
    if not np.isfinite(label).all():
        raise DataError(f"{path}: label contains NaN or inf values")
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi >= num_classes or not np.array_equal(label, np.round(label)):
        raise DataError(f"{path}: label values must be integers in [0, {num_classes - 1}], "
                        f"found range [{lo}, {hi}]")
    return image, label.astype(np.uint8)


def check_prepared(root: Path, cfg) -> bool:
    """Whether `root` is a prepared root (`buarl prepare`), and that the run fits it: its
    kind, class names, channels, and no more labeled cases than it holds."""
    from buarl.prepare import DATASET_FILE, read_info
    info = read_info(root)
    if info is None:
        return False
    where = root / DATASET_FILE
    if cfg.dataset != info["dataset"]:
        raise DataError(f"{where}: a {info['dim']}-D dataset (dataset: {info['dataset']}), but the run has "
                        f"dataset={cfg.dataset}")
    if list(cfg.class_names) != list(info["class_names"]):
        raise DataError(f"{where}: classes {info['class_names']}, but the run has class_names={cfg.class_names}")
    if len(info["channels"]) != cfg.in_channels:
        raise DataError(f"{where}: {len(info['channels'])} input channel(s) ({', '.join(info['channels'])}), "
                        f"but the run has in_channels={cfg.in_channels}")
    if cfg.labeled > int(info["labeled_cases"]):
        raise DataError(f"{where}: labeled={cfg.labeled}, but the dataset has {info['labeled_cases']} labeled "
                        "training cases")
    return True
