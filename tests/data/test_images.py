from __future__ import annotations

import gzip
import struct

import pytest
import torch

from tokenmix.data.images import load_digits, load_idx_directory, load_images, read_idx


def write_idx(path, tensor: torch.Tensor, code: int = 0x08, compress: bool = False) -> None:
    """An IDX file written independently of the reader: big-endian header and items."""
    header = bytes([0, 0, code, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    fmt = {0x08: "B", 0x0C: "i", 0x0D: "f"}[code]
    body = struct.pack(f">{tensor.numel()}{fmt}", *tensor.flatten().tolist())
    data = header + body
    path.write_bytes(gzip.compress(data) if compress else data)


def mnist_directory(root, train: int = 30, test: int = 10, size: int = 8, compress: bool = True):
    generator = torch.Generator().manual_seed(0)
    suffix = ".gz" if compress else ""
    for name, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, size, size), generator=generator, dtype=torch.uint8)
        labels = torch.randint(0, 10, (count,), generator=generator, dtype=torch.uint8)
        labels[:10] = torch.arange(10)  # every class appears
        write_idx(root / f"{name}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(root / f"{name}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return root


@pytest.mark.parametrize("code,dtype", [(0x08, torch.uint8), (0x0C, torch.int32), (0x0D, torch.float32)])
def test_idx_files_read_back(tmp_path, code, dtype):
    tensor = (torch.randn(3, 4, 5) * 100).to(dtype)
    write_idx(tmp_path / "x.idx", tensor, code)
    write_idx(tmp_path / "x.idx.gz", tensor, code, compress=True)
    for name in ("x.idx", "x.idx.gz"):
        read = read_idx(tmp_path / name)
        assert read.dtype == dtype and torch.equal(read, tensor)


def test_bad_idx_files_are_named(tmp_path):
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", torch.zeros(2, 3, dtype=torch.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"declares shape \(2, 3\)"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("compress", [True, False])
def test_an_mnist_format_directory_splits_train_into_train_and_val(tmp_path, compress):
    data = load_idx_directory(mnist_directory(tmp_path, compress=compress), val_size=5)
    assert [len(data.images[s]) for s in ("train", "val", "test")] == [25, 5, 10]
    assert data.shape == (8, 8) and data.levels == 256 and data.num_classes == 10
    assert len(load_images(tmp_path).images["val"]) == 3  # a tenth of a set smaller than 50000
    with pytest.raises(FileNotFoundError, match="no t10k-images"):
        (tmp_path / f"t10k-images-idx3-ubyte{'.gz' if compress else ''}").unlink()
        load_idx_directory(tmp_path, val_size=5)


def test_missing_image_data_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(tmp_path / "nowhere")
    import tokenmix.data.images as images

    monkeypatch.setattr(images, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_images("fashion-mnist")


def test_digits_ship_with_tokenmix_and_are_the_default(monkeypatch):
    """Issue 38.10: `--task image-seq` on a fresh machine stopped for want of Debian's Fashion-MNIST."""
    import tokenmix.data.images as images

    monkeypatch.setattr(images, "FASHION_MNIST_DIR", images.FASHION_MNIST_DIR.parent / "absent")
    data = load_images(None)
    assert data.name == "digits" and sum(len(v) for v in data.labels.values()) == 1797
    sklearn = pytest.importorskip("sklearn.datasets")
    bunch = sklearn.load_digits()
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))  # the split's permutation
    shipped = torch.cat([data.images[s] for s in ("train", "val", "test")])
    assert torch.equal(shipped, torch.from_numpy(bunch.images).to(torch.uint8)[order])
    labels = torch.cat([data.labels[s] for s in ("train", "val", "test")])
    assert torch.equal(labels, torch.from_numpy(bunch.target).long()[order])


def test_digits_split_is_fixed_and_disjoint():
    data = load_digits()
    sizes = [len(data.images[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[0] == 1437
    assert data.levels == 17 and int(max(v.max() for v in data.images.values())) == 16
    assert torch.equal(load_digits().labels["test"], data.labels["test"])
