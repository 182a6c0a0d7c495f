"""Image datasets that install offline: the 8×8 digits (shipped with tokenmix, the default), Fashion-MNIST
from Debian's ``dataset-fashion-mnist`` (or any directory of MNIST-format IDX files)."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidValueError, MissingFileError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMED = ("fashion-mnist", "digits")
# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> (torch dtype, bytes per item).
_IDX_TYPES = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file (``.gz`` or raw) as a tensor of its declared dtype and shape."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise InvalidValueError(f"{str(path)!r} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, itemsize = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    count = 1
    for size in shape:
        count *= size
    body = raw[4 + 4 * ndim :]
    if len(body) != count * itemsize:
        raise InvalidValueError(
            f"{str(path)!r} declares shape {shape} ({count * itemsize} bytes of data) but holds {len(body)}"
        )
    # IDX is big-endian; byte-swap multi-byte items to the machine's order.
    values = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    if itemsize > 1:
        values = values.view(-1, itemsize).flip(1).reshape(-1)
    return values.view(dtype).reshape(shape).clone()


@dataclass(frozen=True)
class ImageData:
    """Images (N, H, W) of integer levels in [0, levels) and labels (N,), split into train/val/test."""

    name: str
    images: dict[str, torch.Tensor]  # split -> uint8 (N, H, W)
    labels: dict[str, torch.Tensor]  # split -> int64 (N,)
    levels: int  # number of intensity levels (256 for 8-bit images)
    num_classes: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.images["train"].shape[1:])


def _find(directory: Path, prefix: str) -> Path:
    for name in (f"{prefix}-idx3-ubyte", f"{prefix}-idx1-ubyte"):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise MissingFileError(
        f"no {prefix}-idx?-ubyte[.gz] file in {str(directory)!r} (an MNIST-format directory holds "
        "train-images, train-labels, t10k-images and t10k-labels)"
    )


def load_idx_directory(directory: str | Path, val_size: int | None = None) -> ImageData:
    """An MNIST-format directory: the last ``val_size`` training images (default: 5000, or a tenth of a
    smaller set) are the validation split, the t10k files the test split."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"image directory {str(directory)!r} does not exist")
    images = {name: read_idx(_find(directory, f"{name}-images")) for name in ("train", "t10k")}
    labels = {name: read_idx(_find(directory, f"{name}-labels")).long() for name in ("train", "t10k")}
    for name in images:
        if images[name].dim() != 3 or images[name].dtype != torch.uint8:
            raise InvalidValueError(
                f"{name}-images must be uint8 of shape (N, H, W), got {images[name].shape}"
            )
        if len(images[name]) != len(labels[name]):
            raise InvalidValueError(f"{name}: {len(images[name])} images but {len(labels[name])} labels")
    if val_size is None:
        val_size = min(5000, len(images["train"]) // 10)
    if not 0 < val_size < len(images["train"]):
        raise InvalidValueError(f"val_size={val_size} must lie in (0, {len(images['train'])})")
    cut = len(images["train"]) - val_size
    return ImageData(
        name=str(directory),
        images={"train": images["train"][:cut], "val": images["train"][cut:], "test": images["t10k"]},
        labels={"train": labels["train"][:cut], "val": labels["train"][cut:], "test": labels["t10k"]},
        levels=256,
        num_classes=int(torch.cat(list(labels.values())).max()) + 1,
    )


DIGITS_DIR = Path(__file__).parent / "corpora"  # the 8×8 digits ship with tokenmix, as IDX files


def load_digits() -> ImageData:
    """The 8×8 digits (1797 images, 17 levels; scikit-learn's copy of the UCI set, shipped with tokenmix),
    split 80/10/10 by a fixed permutation."""
    images = read_idx(DIGITS_DIR / "digits-images-idx3-ubyte.gz")
    labels = read_idx(DIGITS_DIR / "digits-labels-idx1-ubyte.gz").long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    cuts = (0, int(0.8 * len(order)), int(0.9 * len(order)), len(order))
    parts = {name: order[cuts[i] : cuts[i + 1]] for i, name in enumerate(("train", "val", "test"))}
    return ImageData(
        name="digits",
        images={name: images[index] for name, index in parts.items()},
        labels={name: labels[index] for name, index in parts.items()},
        levels=17,
        num_classes=10,
    )


def load_images(data: str | Path | None = None) -> ImageData:
    """``"digits"`` (the default: it ships with tokenmix), ``"fashion-mnist"`` (Debian's
    dataset-fashion-mnist, installed apart), or a directory of MNIST-format IDX files."""
    if data is None or str(data) == "digits":
        return load_digits()
    if str(data) == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise MissingFileError(
                f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}: install Debian's "
                "dataset-fashion-mnist, pass --data DIR (MNIST-format IDX files) or --data digits"
            )
        return load_idx_directory(FASHION_MNIST_DIR)
    return load_idx_directory(data)
