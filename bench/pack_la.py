"""Pack a small LA subset for a size-limited GPU machine (bench/gpu_session.sh): the first 4
names of train.list (2 labeled, 1 unlabeled, 1 val with --la-labeled 2) and the first test
scan, cropped in-plane to 120 x 120 around the atrium (the 112 x 112 x 80 patch still fits),
images 8-bit over each scan's range, labels exact, xz: ~3.5 MB. For speed checks only.

    python bench/pack_la.py ../shared/data/LA .gpu_data/la.u8.xz
    python bench/pack_la.py unpack .gpu_data/la.u8.xz /tmp/LA
"""
import io
import lzma
import os
import sys

import h5py
import numpy as np

SCANS = "2018LA_Seg_Training Set"
SIZE = 120


def crop(image: np.ndarray, label: np.ndarray):
    """SIZE x SIZE in-plane around the label's centre, all slices."""
    starts = []
    for axis in range(2):
        other = tuple(a for a in range(3) if a != axis)
        centre = int(np.mean(np.nonzero(label.any(axis=other))[0]))
        starts.append(min(max(0, centre - SIZE // 2), image.shape[axis] - SIZE))
    window = tuple(slice(s, s + SIZE) for s in starts)
    return image[window], label[window]


def pack(root: str, out: str) -> None:
    train = open(f"{root}/train.list").read().split()[:4]
    test = open(f"{root}/test.list").read().split()[:1]
    arrays = {"train.list": np.frombuffer(("\n".join(train) + "\n").encode(), np.uint8),
              "test.list": np.frombuffer(("\n".join(test) + "\n").encode(), np.uint8)}
    for name in train + test:
        with h5py.File(f"{root}/{SCANS}/{name}/mri_norm2.h5") as h:
            image, label = crop(h["image"][()], h["label"][()])
        lo, hi = float(image.min()), float(image.max())
        arrays[f"{name}|range"] = np.array([lo, hi])
        arrays[f"{name}|image"] = np.round((image - lo) / (hi - lo) * 255).astype(np.uint8)
        arrays[f"{name}|label"] = label.astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    open(out, "wb").write(lzma.compress(buf.getvalue(), preset=6))


def unpack(src: str, root: str) -> None:
    z = np.load(io.BytesIO(lzma.decompress(open(src, "rb").read())))
    os.makedirs(root, exist_ok=True)
    for listing in ("train.list", "test.list"):
        open(f"{root}/{listing}", "wb").write(z[listing].tobytes())
    for key in z.files:
        if key.endswith("|image"):
            name = key.split("|")[0]
            lo, hi = z[f"{name}|range"]
            os.makedirs(f"{root}/{SCANS}/{name}", exist_ok=True)
            with h5py.File(f"{root}/{SCANS}/{name}/mri_norm2.h5", "w") as h:
                h["image"] = (lo + z[key].astype(np.float32) * (hi - lo) / 255).astype(np.float32)
                h["label"] = z[f"{name}|label"]
    print("unpacked the LA subset into", root)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "unpack":
        unpack(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3:
        pack(sys.argv[1], sys.argv[2])
    else:
        raise SystemExit(__doc__)
