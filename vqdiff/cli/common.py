"""Shared argparse helpers for every vqdiff command (scilpy style)."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="More logging (-v info, -vv debug).")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", dest="overwrite", action="store_true", help="Overwrite existing outputs.")


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def check_outputs(parser: argparse.ArgumentParser, paths, overwrite: bool, *, remove: bool = False) -> None:
    """Refuse existing outputs unless ``-f``; with ``remove`` delete them when overwriting."""
    for path in map(Path, paths):
        if path.exists():
            if not overwrite:
                parser.error(f"{path} exists; use -f to overwrite it")
            if remove:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_main(fn) -> None:
    """Run ``fn()``, turning our own input errors into a one-line message and exit code 2."""
    from vqdiff.errors import VQDiffError

    try:
        code = fn()
    except (VQDiffError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
