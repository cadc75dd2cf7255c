"""ACDC in the SSL4MIS layout: 2-D training slices, 3-D val/test volumes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import zoom

from buarl.config import Config, num_classes_of
from buarl.data.augment import augment_batch_2d
from buarl.data.checks import check_prepared, inside, read_case, read_image, read_list, require_root
from buarl.data.types import Case
from buarl.errors import DataError


def patient_of(slice_name: str) -> str:
    return slice_name.split("_")[0]


def case_of(slice_name: str) -> str:
    """A prepared root's case (`buarl prepare` names slices CASE_slice_K; a case name may
    hold underscores)."""
    return slice_name.rsplit("_slice_", 1)[0]


def labeled_slice_count(slices: list[str], patients: int, list_file: Path, group=patient_of) -> int:
    """Slices of the first `patients` patients of train_slices.list (3 -> 68 on ACDC).

    The reference code hard-codes this map for ACDC; counting it from the list gives the
    same numbers there and also works for phantoms and other splits.
    """
    seen: list[str] = []
    for i, name in enumerate(slices):
        p = group(name)
        if not seen or seen[-1] != p:
            if p in seen:
                raise DataError(f"{list_file}: slices of {p} are not contiguous")
            if len(seen) == patients:
                return i
            seen.append(p)
    if len(seen) < patients:
        raise DataError(f"labeled={patients} patients, but {list_file} has only {len(seen)}")
    return len(slices)


def to_size(array: np.ndarray, size: int) -> np.ndarray:
    """Zoom the last two axes to size x size with order 0, as the reference pipeline."""
    h, w = array.shape[-2:]
    factors = (1,) * (array.ndim - 2) + (size / h, size / w)
    return zoom(array, factors, order=0)


class AcdcData:
    num_classes = 4
    dim = 2

    def __init__(self, root: Path, cfg: Config):
        self.root = root = require_root(root, "ACDC (SSL4MIS)")
        self.num_classes = num_classes_of(cfg.dataset, cfg.class_names)
        list_file = root / "train_slices.list"
        slices = read_list(list_file)
        prepared = check_prepared(root, cfg)
        self.n_labeled = labeled_slice_count(slices, cfg.labeled, list_file,
                                             case_of if prepared else patient_of)
        if cfg.base != "supervised" and self.n_labeled == len(slices):
            raise DataError(f"labeled={cfg.labeled} uses every training slice of {list_file}: "
                            f"base={cfg.base} needs unlabeled slices left")
        self.size = cfg.image_size
        # Semi-supervised runs read the unlabeled pool; supervised ones never touch it.
        keep = slices if cfg.base != "supervised" else slices[: self.n_labeled]
        self.channels = cfg.in_channels
        images, labels = [], []
        for i, name in enumerate(keep):
            path = inside(root, f"data/slices/{name}.h5", list_file)
            if i < self.n_labeled:
                image, label = read_case(path, self.num_classes, 2, self.channels)
            else:  # the unlabeled pool: images only (the loop never reads their labels)
                image = read_image(path, 2, self.channels)
                label = np.zeros(image.shape[-2:], np.uint8)
            images.append(to_size(image, self.size))
            labels.append(to_size(label, self.size))
        self.images = torch.from_numpy(np.stack(images))
        self.images = self.images[:, None] if self.channels == 1 else self.images  # (N, C, H, W)
        self.labels = torch.from_numpy(np.stack(labels))
        self.labeled_idx = list(range(self.n_labeled))
        self.unlabeled_idx = list(range(self.n_labeled, len(keep)))
        self.val = self._volumes(root / "val.list", cfg.val_cases)
        self.test = self._volumes(root / "test.list", cfg.test_cases)

    def _volumes(self, list_file: Path, limit: int) -> list[Case]:
        names = read_list(list_file)
        names = names[:limit] if limit else names
        return [Case(n, *read_case(inside(self.root, f"data/{n}.h5", list_file), self.num_classes, 3, self.channels))
                for n in names]

    def batch(self, idx: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The slices `idx`, augmented (SSL4MIS's RandomGenerator), on the host."""
        return augment_batch_2d(self.images[idx], self.labels[idx].long(), gen)
