"""Reading the digit data sets: MNIST (IDX files) and NSYSU exam-box digits.

Local copies are used first; MNIST falls back to a download for users who have none.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir(name: str) -> Path:
    """Where a data set is looked for: $FORMREADER_DATA/NAME, else ../shared/data/NAME."""
    env = os.environ.get("FORMREADER_DATA")
    if env:
        return Path(env) / name
    return _REPO_ROOT.parent / "shared" / "data" / name


def read_idx(path: Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a uint8 array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {np.prod(shape)} values, found {body.size}")
    return body.reshape(shape)


def load_mnist(split: str, data_dir: Path | None = None, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (N, 28, 28) uint8, ink 255 on 0, and labels (N,) uint8.

    Reads `data_dir` (default: `default_data_dir("mnist")`); if the files are not there and
    `download` is true, fetches them into ~/.cache/formreader/mnist first.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    data_dir = Path(data_dir) if data_dir else default_data_dir("mnist")
    names = MNIST_FILES[split]
    if not all((data_dir / n).exists() for n in names):
        if not download:
            raise FileNotFoundError(f"MNIST {split} files not found in {data_dir}")
        data_dir = Path.home() / ".cache" / "formreader" / "mnist"
        data_dir.mkdir(parents=True, exist_ok=True)
        for n in names:
            if not (data_dir / n).exists():
                urllib.request.urlretrieve(MNIST_MIRROR + n, data_dir / (n + ".part"))
                (data_dir / (n + ".part")).rename(data_dir / n)
    images, labels = (read_idx(data_dir / n) for n in names)
    if len(images) != len(labels):
        raise ValueError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_nsysu(path: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NSYSU exam digits: crops (N, 28, 28) uint8 dark ink on white, labels (N,), exam ids (N,)."""
    path = Path(path) if path else default_data_dir("nsysu_digits") / "nsysu_digits.npz"
    with np.load(path) as d:
        return d["x"], d["y"], d["exam"]
