"""Rebuild the embedded MovieLens latest-small archive shipped inside the recforge package.

Usage: python scripts/build_embedded_dataset.py PATH/TO/ml-latest-small [--out ARCHIVE.zip]

The archive mirrors the official one (``ml-latest-small/<file>``) and must carry README.txt, whose license
allows redistribution only together with it. Entries get a fixed date so that rebuilding is reproducible.
"""

from __future__ import annotations

import argparse
import logging
import sys
import zipfile
from pathlib import Path

FILES = ["README.txt", "links.csv", "movies.csv", "ratings.csv", "tags.csv"]
TOP_FOLDER = "ml-latest-small"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/recforge/data/datasets/embedded/ml-latest-small.zip"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date zip can store; keeps the bytes independent of mtimes

log = logging.getLogger("build_embedded_dataset")


def build(source: Path, out: Path) -> Path:
    """Write ``out`` from the MovieLens latest-small files in ``source``; return ``out``."""
    missing = [name for name in FILES if not (source / name).is_file()]
    if missing:
        raise SystemExit(f"{source} lacks {', '.join(missing)}; pass the extracted ml-latest-small folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in FILES:
            info = zipfile.ZipInfo(f"{TOP_FOLDER}/{name}", date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, (source / name).read_bytes(), compresslevel=9)
    tmp.replace(out)
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder holding the ml-latest-small files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"archive to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.source, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
