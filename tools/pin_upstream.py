#!/usr/bin/env python3
"""Maintainer tool: pin a method's scripts and target fingerprints in ``upstream.lock``.

    python tools/pin_upstream.py METHOD CHECKOUT [--repin] [--lock PATH]

CHECKOUT must be a clean clone of the method's repository at the commit the lock pins (or, with
``--repin``, at the commit to pin from now on). The method's table is rewritten from its patch
module (``SCRIPTS`` and ``TARGETS``) and the checkout; the other tables are kept. Only hashes
and paths are written, never upstream code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import git

from dire_plugin.upstream.checkout import normalize_remote_url
from dire_plugin.errors import DiReError
from dire_plugin.upstream.lockfile import MethodLock, fingerprint_symbol, format_lock, parse_lock
from dire_plugin.hooks.registry import load_method

REPO_LOCK = Path(__file__).resolve().parents[1] / "upstream.lock"


def pin(method: str, checkout: Path, lock_file: Path, repin: bool = False) -> MethodLock:
    """Recompute ``method``'s table from ``checkout`` and rewrite ``lock_file``; returns the table."""
    locks: Dict[str, MethodLock] = parse_lock(lock_file.read_text(encoding="utf-8"))
    if method not in locks:
        raise SystemExit(f"{method} is not in {lock_file}: add its repository and commit by hand first")
    old = locks[method]
    module = load_method(method)
    with git.Repo(checkout) as repo:
        if Path(repo.working_tree_dir).resolve() != checkout.resolve():
            raise SystemExit(f"{checkout} is not the root of a git work tree")
        if repo.is_dirty(untracked_files=True):
            raise SystemExit(f"{checkout} has uncommitted changes: pin from a clean checkout")
        urls = [normalize_remote_url(u) for r in repo.remotes for u in r.urls]
        if normalize_remote_url(old.repository) not in urls:
            raise SystemExit(f"{checkout} has no remote {old.repository}")
        head = repo.head.commit.hexsha
    if head != old.commit and not repin:
        raise SystemExit(f"{checkout} is at {head}, the lock pins {old.commit}: check that out, or pass --repin")
    missing: List[str] = [s for s in module.SCRIPTS if not (checkout / s).is_file()]
    if missing:
        raise SystemExit(f"scripts missing in {checkout}: {', '.join(missing)}")
    fingerprints = {(t.file, t.symbol): fingerprint_symbol(checkout / t.file, t.symbol) for t in module.TARGETS}
    new = MethodLock(method, old.repository, head, tuple(module.SCRIPTS), fingerprints)
    locks[method] = new
    lock_file.write_text(format_lock(locks.values()), encoding="utf-8")
    return new


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--repin", action="store_true", help="pin the checkout's HEAD instead of the locked commit")
    parser.add_argument("--lock", type=Path, default=REPO_LOCK, help=f"lock file to rewrite (default {REPO_LOCK})")
    args = parser.parse_args(argv)
    try:
        new = pin(args.method.lower(), args.checkout, args.lock, args.repin)
    except DiReError as exc:
        print(f"pin_upstream: error: {exc}", file=sys.stderr)
        return 2
    print(f"{new.method}: {new.commit}, {len(new.scripts)} scripts, {len(new.fingerprints)} fingerprints -> {args.lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
