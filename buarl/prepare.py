"""`buarl prepare SOURCE --out ROOT`: a user's NIfTI dataset as a buarl data root.

SOURCE is laid out as nnU-Net v2 raw (`dataset.json` with channel_names, labels and
file_ending; `imagesTr/CASE_0000.nii.gz`, `labelsTr/CASE.nii.gz`), as the Medical
Segmentation Decathlon (`dataset.json` with a `training` list; several modalities as one
4-D image), or as a plain folder pair `images/CASE.nii.gz` + `labels/CASE.nii.gz` whose
classes `--labels NAME=VALUE ...` names. A training image without a label file is an
unlabeled case.

The root is written in the layout of the benchmark of its kind, which every command reads:
2-D (strongly anisotropic spacing, as nnU-Net decides; ACDC's SSL4MIS layout, training
volumes cut into slices) or 3-D (LA's UA-MT layout), with `dataset.yaml` beside it: the
kind, channels, class names, the normalisation, the split and each case's spacing and
affine. Everything is read and checked before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from buarl.errors import DataError
from buarl.volume_io import case_and_channel, kind_of, stem

FORMAT = "buarl-prepared-v1"
DATASET_FILE = "dataset.yaml"
ANISOTROPY = 3.0  # nnU-Net's threshold: a spacing 3x the finest one makes the data 2-D
SCANS = "2018LA_Seg_Training Set"  # the 3-D layout's folder (buarl.data.la)


@dataclass
class SourceCase:
    name: str
    images: list[Path]            # one file per channel, or one 4-D file (channel: last axis)
    label: Optional[Path] = None  # None: an unlabeled case
    four_d: bool = False


@dataclass
class Source:
    name: str
    channels: list[str]
    classes: dict[int, str]       # label value -> name, background included
    cases: list[SourceCase] = field(default_factory=list)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no dataset.json (expected an nnU-Net v2 raw or a Decathlon dataset, or "
                        "images/ + labels/ with --labels)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None


def _classes(meta: dict, path: Path) -> dict[int, str]:
    """nnU-Net's {name: value} or the Decathlon's {value: name}, as {value: name}."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: key 'labels' must map class names and values")
    out = {}
    for k, v in labels.items():
        value, name = (v, k) if not str(k).isdigit() else (k, v)
        if isinstance(value, list) or not str(value).isdigit():
            raise DataError(f"{path}: label {k!r}: {v!r} is not one integer value (region-based labels are not supported)")
        out[int(value)] = str(name)
    if sorted(out) != list(range(len(out))):
        raise DataError(f"{path}: label values must be 0..{len(out) - 1}, got {sorted(out)}")
    return out


ENDINGS = (".nii.gz", ".nii")


def channel_files(files: list[Path], channels: int, folder: Path) -> dict[str, list[Path]]:
    """nnU-Net's CASE_XXXX files (XXXX: the channel) by case, in channel order; a file not
    so named, or a case that misses a channel, is one DataError naming it."""
    by_case: dict[str, dict[int, Path]] = {}
    for f in files:
        parsed = case_and_channel(f)
        if parsed is None:
            raise DataError(f"{f}: not named CASE_XXXX{kind_of(f)} (XXXX: the channel)")
        by_case.setdefault(parsed[0], {})[parsed[1]] = f
    out = {}
    for case, got in sorted(by_case.items()):
        ending = kind_of(next(iter(got.values())))
        missing = [f"{case}_{c:04d}{ending}" for c in range(channels) if c not in got]
        if missing:
            raise DataError(f"{folder}: case {case} misses channel file(s) {', '.join(missing)}")
        out[case] = [got[c] for c in range(channels)]
    return out


def _label(folder: Path, case: str, image: Path) -> Optional[Path]:
    """The case's label file (its image's file ending), None for an unlabeled case."""
    label = folder / f"{case}{kind_of(image)}"
    return label if label.is_file() else None


def parse_labels(pairs: list[str]) -> dict[str, int]:
    """`--labels background=0 lesion=1` as nnU-Net's {name: value}."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise DataError(f"--labels {pair!r}: expected NAME=VALUE with VALUE an integer (e.g. background=0)")
        out[name] = int(value)
    return out


def read_plain(source: Path, labels: Optional[list[str]], channels: list[str]) -> Source:
    """`images/` + `labels/`: one NIfTI per case (or CASE_0000, CASE_0001, ... per channel
    when several channels are named), its label of the same name; classes from --labels."""
    if not labels:
        raise DataError(f"{source}: a plain images/ + labels/ folder has no dataset.json: name its classes with "
                        "--labels NAME=VALUE ... (e.g. --labels background=0 lesion=1)")
    classes = _classes({"labels": parse_labels(labels)}, Path("--labels"))
    images = source / "images"
    files = sorted(f for f in images.iterdir() if f.name.endswith(ENDINGS))
    grouped = ({stem(f): [f] for f in files} if len(channels) == 1
               else channel_files(files, len(channels), images))
    cases = [SourceCase(case, group, _label(source / "labels", case, group[0])) for case, group in grouped.items()]
    return Source(source.name, list(channels), classes, cases)


def read_source(source: Path, labels: Optional[list[str]] = None, channels: Optional[list[str]] = None) -> Source:
    """The cases of an nnU-Net v2 raw, Decathlon or plain images/ + labels/ dataset (files
    named, not yet read)."""
    meta_path = source / "dataset.json"
    if not meta_path.is_file() and (source / "images").is_dir():
        return read_plain(source, labels, channels or ["MRI"])
    if labels or channels:
        raise DataError(f"--labels / --channels name a plain images/ + labels/ folder's classes and channels; "
                        f"{source} has {'dataset.json' if meta_path.is_file() else 'no images/ folder'}")
    meta = _json(meta_path)
    classes = _classes(meta, meta_path)
    if "channel_names" in meta:  # nnU-Net v2
        channels = [str(meta["channel_names"][k]) for k in sorted(meta["channel_names"], key=int)]
        ending = meta.get("file_ending", ".nii.gz")
        images = source / "imagesTr"
        if not images.is_dir():
            raise DataError(f"{images}: folder missing (nnU-Net v2 raw keeps training images there)")
        cases = [SourceCase(case, files, _label(source / "labelsTr", case, files[0]))
                 for case, files in channel_files(sorted(images.glob(f"*{ending}")), len(channels), images).items()]
        return Source(str(meta.get("name") or source.name), channels, classes, cases)
    if "training" in meta:  # Medical Segmentation Decathlon
        modality = meta.get("modality") or {"0": "MRI"}
        channels = [str(modality[k]) for k in sorted(modality, key=int)]
        cases = []
        for entry in meta["training"]:
            image = source / entry["image"]
            label = source / entry["label"] if entry.get("label") else None
            name = image.name.split(".")[0]
            cases.append(SourceCase(name, [image], label, four_d=len(channels) > 1))
        return Source(str(meta.get("name") or source.name), channels, classes, cases)
    raise DataError(f"{meta_path}: neither nnU-Net v2 ('channel_names') nor Decathlon ('training') keys")


def _load(path: Path):
    import nibabel as nib
    try:
        img = nib.load(str(path))
        return np.asarray(img.dataobj), np.asarray(img.affine, dtype=float), tuple(float(z) for z in img.header.get_zooms()[:3])
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None
    except Exception as e:  # nibabel raises its own kinds for a bad header or payload
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None


@dataclass
class Volume:
    name: str
    image: np.ndarray             # (C, X, Y, Z), float32, as read
    label: Optional[np.ndarray]   # (X, Y, Z), uint8
    affine: np.ndarray
    spacing: tuple


def read_case(case: SourceCase, source: Source, with_label: bool) -> Volume:
    """One case's channels (and label), checked: shapes, affines, label values."""
    if case.four_d:
        data, affine, spacing = _load(case.images[0])
        if data.ndim != 4 or data.shape[3] != len(source.channels):
            raise DataError(f"{case.images[0]}: shape {data.shape}, expected (X, Y, Z, {len(source.channels)})")
        channels = [data[..., c] for c in range(data.shape[3])]
    else:
        channels, affine, spacing = [], None, None
        for f in case.images:
            data, a, s = _load(f)
            if data.ndim == 4 and data.shape[3] == 1:  # one frame stored 4-D
                data = data[..., 0]
            if data.ndim != 3:
                raise DataError(f"{f}: shape {data.shape}, expected a 3-D volume")
            if channels and data.shape != channels[0].shape:
                raise DataError(f"{f}: shape {data.shape} != {channels[0].shape} of {case.images[0].name}")
            if affine is not None and not np.allclose(a, affine, atol=1e-3):
                raise DataError(f"{f}: affine differs from {case.images[0].name}'s")
            channels.append(data)
            affine, spacing = a, s
    image = np.stack(channels).astype(np.float32)
    if not np.isfinite(image).all():
        raise DataError(f"{case.images[0]}: image contains NaN or inf values")
    label = None
    if with_label and case.label is not None:
        raw, a, _ = _load(case.label)
        if raw.shape != image.shape[1:]:
            raise DataError(f"{case.label}: label shape {raw.shape} != image shape {image.shape[1:]}")
        if not np.allclose(a, affine, atol=1e-3):
            raise DataError(f"{case.label}: label affine differs from the image's ({case.images[0].name})")
        values = np.unique(raw)
        bad = [v for v in values.tolist() if v not in source.classes]
        if bad:
            raise DataError(f"{case.label}: label values {bad} are not in dataset.json's labels {sorted(source.classes)}")
        label = raw.astype(np.uint8)
    return Volume(case.name, image, label, affine, spacing)


def is_ct(channel: str) -> bool:
    return channel.strip().lower() == "ct"


def ct_statistics(volumes: list[Volume], channel: int) -> dict:
    """nnU-Net's CT scheme, from the labeled training cases' foreground voxels: clip to their
    0.5 and 99.5 percentiles, then subtract their mean and divide by their std."""
    fg = np.concatenate([v.image[channel][v.label > 0] for v in volumes if v.label is not None])
    if fg.size == 0:
        raise DataError("CT normalisation: the labeled training cases have no foreground voxels")
    lo, hi = np.percentile(fg, [0.5, 99.5])
    clipped = np.clip(fg, lo, hi)
    return {"scheme": "ct", "clip": [float(lo), float(hi)], "mean": float(clipped.mean()),
            "std": float(max(clipped.std(), 1e-8))}


def normalise(image: np.ndarray, schemes: list[dict]) -> np.ndarray:
    """Each channel by its scheme: ct (dataset statistics), zscore or minmax (per volume;
    minmax to [0, 1] as in the ACDC h5 files)."""
    out = np.empty_like(image, dtype=np.float32)
    for c, s in enumerate(schemes):
        x = image[c].astype(np.float64)
        if s["scheme"] == "ct":
            x = (np.clip(x, *s["clip"]) - s["mean"]) / s["std"]
        elif s["scheme"] == "zscore":
            x = (x - x.mean()) / max(x.std(), 1e-8)
        else:
            span = x.max() - x.min()
            x = (x - x.min()) / span if span > 0 else np.zeros_like(x)
        out[c] = x
    return out


def choose_dim(spacings: list[tuple]) -> int:
    """2 when the median spacing's coarsest axis is ANISOTROPY x its finest, else 3."""
    median = np.median(np.asarray(spacings), axis=0)
    return 2 if median.max() / median.min() >= ANISOTROPY else 3


def slice_axis(spacing: tuple) -> int:
    return int(np.argmax(spacing))


def to_slices_first(array: np.ndarray, axis: int) -> np.ndarray:
    """(X, Y, Z) -> (D, H, W) with D the slice axis and the in-plane axes reversed: the
    (Z, Y, X) order of the ACDC h5 volumes for a NIfTI sliced along Z."""
    others = [a for a in range(3) if a != axis]
    return np.ascontiguousarray(np.transpose(array, [axis] + others[::-1]))


def split(labeled: list[str], unlabeled: list[str], val: int, test: int, n_labeled: Optional[int],
          seed: int) -> dict[str, list[str]]:
    """val, test, then labeled training cases from a seeded permutation of the labeled
    cases; labeled cases beyond --labeled become unlabeled (their labels are not written)."""
    need = val + test + (n_labeled if n_labeled is not None else 1)
    if len(labeled) < need:
        raise DataError(f"{len(labeled)} labeled case(s), but --val {val} + --test {test} + "
                        f"--labeled {n_labeled if n_labeled is not None else 1} need {need}")
    order = [labeled[i] for i in np.random.default_rng(seed).permutation(len(labeled))]
    rest = order[val + test:]
    keep = rest if n_labeled is None else rest[:n_labeled]
    return {"val": order[:val], "test": order[val:val + test], "labeled": keep,
            "unlabeled": rest[len(keep):] + sorted(unlabeled)}


def _h5(path: Path, image: np.ndarray, label: Optional[np.ndarray]) -> None:
    import h5py
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        if label is not None:
            f.create_dataset("label", data=label.astype(np.uint8), compression="gzip")


def prepare(source: Path, out: Path, val: int = 1, test: int = 1, labeled: Optional[int] = None,
            dim: Optional[int] = None, mr_norm: str = "minmax", seed: int = 0, labels: Optional[list[str]] = None,
            channels: Optional[list[str]] = None, log=print) -> dict:
    """Read and check every case of `source`, then write the data root `out`; returns its
    dataset.yaml content."""
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out}: folder exists and is not empty; choose a new folder")
    src = read_source(source, labels, channels)
    if not src.cases:
        raise DataError(f"{source}: the dataset has no training cases")
    names = [c.name for c in src.cases]
    have = [c.name for c in src.cases if c.label is not None]
    parts = split(have, [n for n in names if n not in have], val, test, labeled, seed)
    keep_label = set(parts["val"]) | set(parts["test"]) | set(parts["labeled"])
    by_name = {c.name: c for c in src.cases}
    # read everything first: a bad file stops the command before anything is written
    volumes = {n: read_case(by_name[n], src, with_label=n in keep_label) for n in names}
    if len(src.classes) < 2:
        raise DataError(f"{source / 'dataset.json'}: labels name no foreground class")
    kind = dim or choose_dim([v.spacing for v in volumes.values()])
    train = [volumes[n] for n in parts["labeled"]]
    schemes = [ct_statistics(train, c) if is_ct(ch) else {"scheme": mr_norm} for c, ch in enumerate(src.channels)]
    log(f"{src.name}: {len(names)} cases ({len(parts['labeled'])} labeled training, {len(parts['unlabeled'])} "
        f"unlabeled, {len(parts['val'])} val, {len(parts['test'])} test), {len(src.channels)} channel(s), "
        f"{len(src.classes) - 1} foreground class(es), {kind}-D")

    out.mkdir(parents=True, exist_ok=True)
    cases_meta = {}
    squeeze = len(src.channels) == 1  # one channel: the benchmark's own shapes, no channel axis
    for role in ("labeled", "unlabeled", "val", "test"):
        for n in parts[role]:
            v = volumes[n]
            image = normalise(v.image, schemes)
            label = v.label if n in keep_label else None
            cases_meta[n] = {"role": role, "shape": list(v.image.shape[1:]), "spacing": list(v.spacing),
                             "affine": v.affine.tolist()}
            if kind == 2:
                axis = slice_axis(v.spacing)
                cases_meta[n]["slice_axis"] = axis
                image = np.stack([to_slices_first(ch, axis) for ch in image])
                label = to_slices_first(label, axis) if label is not None else None
                img = image[0] if squeeze else image
                if role in ("labeled", "unlabeled"):
                    for k in range(image.shape[1]):
                        _h5(out / "data" / "slices" / f"{n}_slice_{k}.h5", img[k] if squeeze else img[:, k],
                            label[k] if label is not None else None)
                else:
                    _h5(out / "data" / f"{n}.h5", img, label)
            else:
                _h5(out / SCANS / n / "mri_norm2.h5", image[0] if squeeze else image, label)
    train_cases = parts["labeled"] + parts["unlabeled"]
    if kind == 2:
        slices = [f"{n}_slice_{k}" for n in train_cases for k in range(cases_meta[n]["shape"][cases_meta[n]["slice_axis"]])]
        (out / "train_slices.list").write_text("\n".join(slices) + "\n")
        (out / "train.list").write_text("\n".join(train_cases) + "\n")
        (out / "val.list").write_text("".join(f"{n}\n" for n in parts["val"]))
    else:  # buarl.data.la takes validation from the tail of train.list
        (out / "train.list").write_text("\n".join(train_cases + parts["val"]) + "\n")
    (out / "test.list").write_text("".join(f"{n}\n" for n in parts["test"]))
    info = {"format": FORMAT, "name": src.name, "source": str(source.resolve()),
            "dim": kind, "dataset": "acdc" if kind == 2 else "la",
            "channels": src.channels, "class_names": [src.classes[i] for i in range(1, len(src.classes))],
            "normalisation": schemes, "labeled_cases": len(parts["labeled"]),
            "val_cases": len(parts["val"]), "test_cases": len(parts["test"]), "seed": seed,
            "split": parts, "cases": cases_meta}
    (out / DATASET_FILE).write_text(yaml.safe_dump(info, sort_keys=False))
    log(f"wrote {out} ({'2-D slices, SSL4MIS layout' if kind == 2 else '3-D volumes, UA-MT layout'}); "
        f"train on it with --data-root {out}")
    return info


def read_info(root: Path) -> Optional[dict]:
    """A prepared root's dataset.yaml; None for a benchmark root (no such file)."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        return None
    try:
        info = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: not readable YAML ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{path}: not a buarl dataset.yaml (format {FORMAT}); make it with `buarl prepare`")
    return info


def settings(root: Path) -> dict:
    """The config values a prepared root decides: its kind (the network), input channels,
    class names and validation split; {} for a benchmark root."""
    info = read_info(root)
    if info is None:
        return {}
    values = {"dataset": info["dataset"], "class_names": list(info["class_names"]),
              "in_channels": len(info["channels"]), "normalisation": info["normalisation"], "test_cases": 0}
    # 2-D: every case of val.list; 3-D: the tail of train.list that prepare set apart
    values["val_cases"] = 0 if info["dim"] == 2 else int(info["val_cases"])
    return values
