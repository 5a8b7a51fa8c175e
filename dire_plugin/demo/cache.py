"""Folders the demo writes once into its cache and checks on every use: the digits ImageFolder the
DiRe bank reads, the MTT family's expert trajectories.

A finished folder holds a marker (``.complete``) keyed on what the folder was made from (its
*source*: the images, or the settings and data) with a checksum of every file. Each use checks
all of it: a folder that is not exactly what was written (a damaged, missing or stray file, an
unreadable marker, another source) is rebuilt with one warning line. It is written in a temporary
sibling and renamed, so an interrupted run never leaves a half folder that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from .log import warn

__all__ = ["MARKER", "cached_folder", "folder_problem"]

MARKER = ".complete"
_FORMAT = 2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parents(name: str):
    parts = name.split("/")[:-1]
    return {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}


def folder_problem(root: Path, source: str) -> Optional[str]:
    """Why the folder at ``root`` cannot be used for ``source`` (``"missing"`` when there is none),
    or ``None`` when every file is there, unchanged, and nothing else is."""
    if not root.exists() and not root.is_symlink():
        return "missing"
    if not root.is_dir():
        return "is not a folder"
    try:
        marker = json.loads((root / MARKER).read_text())
    except FileNotFoundError:
        return f"has no {MARKER} marker (an interrupted write?)"
    except (OSError, ValueError) as e:  # a folder in its place, bytes that are not JSON, ...
        return f"has an unreadable {MARKER} marker ({type(e).__name__})"
    if not isinstance(marker, dict) or marker.get("format") != _FORMAT or not isinstance(marker.get("files"), dict):
        return "was written by an older version of the demo"
    if marker.get("source") != source:
        return "was written from other data or settings"
    expected = marker["files"]
    try:
        present = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()} - {MARKER}
        folders = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}
        # An empty class folder would be one more class to ImageFolder; a stray file, one more image.
        allowed = set().union(*(_parents(name) for name in expected)) if expected else set()
        extra = sorted(present - set(expected)) + sorted(folders - allowed)
        if extra:
            return f"holds {extra[0]}, which the demo did not write"
        for name, digest in expected.items():
            path = root / name
            if not path.is_file():
                return f"lacks {name}"
            if _sha256(path) != digest:
                return f"holds a damaged {name}"
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def cached_folder(root: os.PathLike, source: str, write: Callable[[Path], None], what: str) -> Tuple[Path, bool]:
    """``(root, cache hit)``: the folder at ``root`` if it is sound for ``source``; else
    ``write(folder)`` fills a temporary sibling, which is checksummed and renamed to ``root`` (one
    warning line naming ``what`` when a broken folder is replaced)."""
    root = Path(root)
    problem = folder_problem(root, source)
    if problem is None:
        return root, True
    if problem != "missing":
        warn(f"{what} {root} {problem}; rebuilding it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        write(tmp)
        files: Dict[str, str] = {p.relative_to(tmp).as_posix(): _sha256(p)
                                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MARKER).write_text(json.dumps({"format": _FORMAT, "source": source, "files": files}))
        _remove(root)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another demo sharing the cache renamed its copy in first: use it if it is sound.
            if folder_problem(root, source) is not None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root, False
