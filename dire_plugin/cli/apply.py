"""``dire-apply``: switch DiRe on for an upstream checkout, off again, and report.

Applying writes ``<checkout>/.dire/<method>.json`` (and ``exclude.json``, what it did to the
exclude file), hides ``.dire/`` in ``.git/info/exclude`` and
lists the checkout in the start-up ``.pth`` (see :mod:`dire_plugin.activation.applied`); the upstream's
files are never touched. Every check runs before the first write, so a refused command leaves
everything as it was. Exit codes: 0 done, 1 ``--verify`` found drift (or a write failed),
2 bad input (or a lock file that does not fit the patches).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Optional, Sequence, Tuple

import git

import dire_plugin

from ..activation import applied as activation
from ..upstream.checkout import (
    CheckoutState,
    git_reason,
    hide_config_dir,
    inspect_checkout,
    open_repo,
    survey_checkout,
    unhide_config_dir,
)
from ..errors import DiReError, DiReInputError
from ..io.files import locked
from ..activation.checks import check_cache_dir, check_real_data_for_scripts
from ..upstream.lockfile import LockError, MethodLock, check_patch_matches_lock, load_lock
from ..hooks.registry import METHODS, load_method
from ..hooks.settings import BANK_DTYPES, check_run_settings
from ..regularizer.defaults import LOGDET_KERNELS
from ._common import WEIGHTS_AND_SHARE, OneLineParser, components, existing_dir, run_main, share, weight

__all__ = ["ENV_CLONE_URL", "build_parser", "main"]

PROG = "dire-apply"
#: Clone from here instead of the lock's repository with ``--clone`` (a mirror; tests use a
#: local fixture repository).
ENV_CLONE_URL = "DIRE_CLONE_URL"
#: Options that only make sense when applying (``--verify --smoke`` reads them too).
_APPLY_OPTIONS = ("real_data", "r_c", "r_e", "r_d", "share", "components", "logdet_kernel", "reduction", "cache_dir",
                  "bank_dtype", "clone")
#: The options that fix weights (refused together with --share).
WEIGHT_OPTIONS = ("r_c", "r_e", "r_d")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dire-apply``."""
    p = OneLineParser(
        prog=PROG,
        description="Apply the DiRe regulariser to an upstream dataset-condensation checkout "
        "without editing its files, then run the upstream's own commands as usual.",
        epilog=f"examples: {PROG} sre2l ~/SRe2L --real-data ~/data/cifar100 | "
        f"{PROG} --remove sre2l ~/SRe2L | {PROG} --verify sre2l ~/SRe2L | {PROG} --list",
    )
    p.add_argument("method", nargs="?", metavar="METHOD", help="upstream method (see --list)")
    p.add_argument("path", nargs="?", metavar="PATH", help="root of the upstream git clone")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--remove", action="store_true", help="undo dire-apply on PATH")
    mode.add_argument("--list", action="store_true", help="list methods, pinned commits and covered scripts")
    mode.add_argument("--status", action="store_true", help="list the checkouts DiRe is applied to")
    mode.add_argument("--verify", action="store_true", help="check PATH against the pinned commit and fingerprints")
    p.add_argument("--smoke", action="store_true", help="with --verify: also run a tiny CPU synthesis")
    p.add_argument("--real-data", metavar="DIR", help="real images of the dataset (required to apply)")
    p.add_argument("--r-c", type=weight, metavar="F", help="weight of the cosine term (default: the method's, see --list)")
    p.add_argument("--r-e", type=weight, metavar="F", help="weight of the Euclidean term (default: the method's, see --list)")
    p.add_argument("--r-d", type=weight, metavar="F", help="weight of the logdet term (only with --components ...,logdet)")
    p.add_argument("--components", type=components, metavar="LIST", help="comma-separated terms: cd,cdm,edm (default) "
                   "and logdet, the determinantal one")
    p.add_argument("--logdet-kernel", choices=LOGDET_KERNELS, help="kernel of the logdet term (default cosine)")
    p.add_argument("--share", type=share, metavar="S", help="calibrate r_c and r_e (their ratio kept) on the first "
                   "synthesis steps so that DiRe's gradient is S times the method's on the images "
                   "(default: the method's own, see --list)")
    p.add_argument("--reduction", choices=("mean", "sum"), help="over classes (default mean)")
    p.add_argument("--cache-dir", metavar="DIR", help="real-embedding cache (default PATH/.dire/cache)")
    p.add_argument("--bank-dtype", choices=BANK_DTYPES, help="storage of the real-embedding bank (default float32; "
                   "float16/bfloat16 halve its memory)")
    p.add_argument("--allow-drift", action="store_true",
                   help="accept another commit than the pinned one if every fingerprint matches")
    p.add_argument("--clone", action="store_true", help="clone the pinned upstream to PATH first if PATH does not exist")
    return p


def _check_combination(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in _APPLY_OPTIONS if getattr(args, name) not in (None, False)]
    if args.smoke and not args.verify:
        parser.error("--smoke goes with --verify")
    if args.list or args.status:
        extra = given + (["--allow-drift"] if args.allow_drift else [])
        if args.method or extra:
            parser.error(f"--{'list' if args.list else 'status'} takes no METHOD, PATH or {', '.join(extra) or 'options'}")
        return
    if not (args.method and args.path):
        parser.error("METHOD and PATH are required")
    if args.remove and (given or args.allow_drift):
        parser.error(f"--remove takes no {', '.join(given + (['--allow-drift'] if args.allow_drift else []))}")
    if args.verify and args.clone:
        parser.error("--clone goes with applying, not --verify")
    if args.share is not None and any(getattr(args, k) is not None for k in WEIGHT_OPTIONS):
        parser.error(WEIGHTS_AND_SHARE)


# --- methods ------------------------------------------------------------------------------------


def _supported(name: str) -> Tuple[MethodLock, ModuleType]:
    """Lock and patch module of a method that can be applied; else a one-line error."""
    locks = load_lock()
    key = name.lower()
    if key not in locks and key not in METHODS:
        known = list(locks) + [m for m in METHODS if m not in locks]
        raise DiReInputError(f"unknown method {name!r}: choose one of {', '.join(known)}")
    if key not in METHODS:
        supported = ", ".join(m for m in METHODS if m in locks)
        raise DiReInputError(
            f"{key} is not supported yet: dire-plugin {dire_plugin.__version__} pins "
            f"{locks[key].repository} but has no patch for it (supported: {supported})"
        )
    if key not in locks:
        raise LockError(f"upstream.lock does not pin {key}: a dire-plugin packaging bug")
    module = load_method(key)
    check_patch_matches_lock(locks[key], module)
    return locks[key], module


def _cache_dir(path: Optional[str]) -> Optional[Path]:
    return None if path is None else check_cache_dir(path)


def _weights(args: argparse.Namespace, module: ModuleType) -> Dict[str, Any]:
    """``r_c``, ``r_e``, ``r_d``, ``share`` and the components of the options: explicit weights, a
    share (calibrated from the released weights), or the method's own default."""
    from ..regularizer.defaults import COMPONENTS, DEFAULT_R_C, DEFAULT_R_D, DEFAULT_R_E

    chosen = {"components": list(args.components or COMPONENTS), "logdet_kernel": args.logdet_kernel or "cosine"}
    given = {k: getattr(args, k) for k in WEIGHT_OPTIONS if getattr(args, k) is not None}
    if args.share is not None:
        return {"r_c": DEFAULT_R_C, "r_e": DEFAULT_R_E, "r_d": DEFAULT_R_D, "share": args.share, **chosen}
    if given:
        return {"r_c": DEFAULT_R_C, "r_e": DEFAULT_R_E, "r_d": DEFAULT_R_D, **given, "share": None, **chosen}
    return {**module.DEFAULT_WEIGHTS.settings(), **chosen}


def _config(args: argparse.Namespace, lock: MethodLock, module: ModuleType, root: Path, head: str,
            real_data: Optional[Path], cache_dir: Optional[Path]) -> Dict[str, Any]:
    return {
        "method": lock.method,
        "repository": lock.repository,
        "commit": head,
        "pinned_commit": lock.commit,
        **_weights(args, module),
        "reduction": args.reduction or "mean",
        "bank_dtype": args.bank_dtype or "float32",
        "real_data": str(real_data) if real_data else "",
        "cache_dir": str(cache_dir or root / activation.CONFIG_DIR / "cache"),
        "plugin_version": dire_plugin.__version__,
        "applied_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- apply --------------------------------------------------------------------------------------


def _clone(lock: MethodLock, path: Path) -> Tuple[Path, Path]:
    """Clone the lock's repository to ``path`` at the pinned commit (detached HEAD); returns
    the clone and the top-most folder the clone created (to remove if the apply fails)."""
    url = os.environ.get(ENV_CLONE_URL) or lock.repository
    created = path.absolute()  # the top-most folder the clone creates: removed again on failure
    while not created.parent.exists():
        created = created.parent
    print(f"cloning {url} into {path} at {lock.commit} ...", flush=True)
    try:
        repo = git.Repo.clone_from(url, str(path), no_checkout=True)
        with repo:
            repo.git.checkout(lock.commit)
            if url != lock.repository:
                # A mirror: name the real upstream too, so the checkout passes the remote check
                # and later fetches can go to either.
                repo.create_remote("upstream", lock.repository)
    except git.GitCommandError as exc:
        shutil.rmtree(created, ignore_errors=True)
        raise DiReInputError(f"cannot clone {url} at {lock.commit}: {git_reason(exc)}") from None
    return path.resolve(), created


def _readable_exclude_record(root: Path) -> Optional[Dict[str, Any]]:
    """The exclude record, or ``None`` when it cannot be read: the line then stays in
    ``.git/info/exclude`` (harmless) rather than blocking the way out."""
    try:
        return activation.read_exclude_record(root)
    except DiReInputError:
        return None


def _readable_config(root: Path, method: str) -> Optional[Dict[str, Any]]:
    """The method's settings; an unreadable file counts as present but empty, so re-applying or
    removing is the way out of a broken one."""
    try:
        return activation.read_config(root, method)
    except DiReInputError:
        return {}


def _apply(args: argparse.Namespace) -> int:
    lock, module = _supported(args.method)
    check_run_settings(_weights(args, module))  # e.g. --r-c 0 --r-e 0: a run that adds nothing, refused now
    real_data = existing_dir(args.real_data, "--real-data")
    fits = check_real_data_for_scripts(real_data, module.SCRIPTS)
    cache_dir = _cache_dir(args.cache_dir)
    path = Path(args.path).expanduser()
    cloned = None
    if args.clone and not os.path.lexists(path):
        cloned = _clone(lock, path)[1]
    elif args.clone:
        print(f"{path} exists: applying to it instead of cloning")
    try:
        state = inspect_checkout(path, lock, allow_drift=args.allow_drift)
    except DiReError:
        if cloned is not None:  # ours: leave nothing behind
            shutil.rmtree(cloned, ignore_errors=True)
        raise
    root = state.root

    # Every check passed: from here on we write, one dire-apply at a time per checkout. The lock is
    # on the checkout folder, which outlives .dire/ (a --remove deletes that while holding it).
    folder = root / activation.CONFIG_DIR
    with locked(root):
        first = not folder.exists()
        record: Optional[Dict[str, Any]] = None
        try:
            note = activation.migrate_legacy_config(root)
            previous = _readable_config(root, lock.method)
            record = hide_config_dir(root, _readable_exclude_record(root))
            activation.write_exclude_record(root, record)
            config = _config(args, lock, module, root, state.head, real_data, cache_dir)
            config_file = activation.write_config(root, lock.method, config)
            pth = activation.register_checkout(root)
            others = [m for m in activation.applied_methods(root) if m != lock.method]
        except BaseException:
            if first:  # a first apply that failed half-way: take back what we wrote
                unhide_config_dir(root, record)
                shutil.rmtree(folder, ignore_errors=True)
            if cloned is not None:
                shutil.rmtree(cloned, ignore_errors=True)
            raise
    if note:
        print(note)
    _print_applied(state, module, config, config_file, pth, previous, fits, others)
    return 0


def _print_applied(state: CheckoutState, module: ModuleType, config: Dict[str, Any], config_file: Path, pth: Path,
                   previous: Optional[Dict[str, Any]], fits: Sequence[str], others: Sequence[str]) -> None:
    again = f" (re-applied: its {config['method']} settings replaced)" if previous is not None else ""
    pin = "the pinned commit" if state.at_pin else f"pinned {state.pinned}; accepted with --allow-drift, all fingerprints match"
    print(f"DiRe applied to {state.root} for {config['method']}{again}")
    print(f"  upstream   {config['repository']} @ {state.head} ({pin})")
    scripts = list(module.SCRIPTS)
    print(f"  scripts    {scripts[0]}")
    for script in scripts[1:]:
        print(f"             {script}")
    if config.get("share") is not None:
        print(f"  share      {config['share']} (r_c and r_e calibrated from {config['r_c']}, {config['r_e']} "
              "on the first synthesis steps)")
    else:
        print(f"  r_c        {config['r_c']}")
        print(f"  r_e        {config['r_e']}")
    print(f"  reduction  {config['reduction']}")
    print(f"  real data  {config['real_data']} (fits {', '.join(fits)})")
    print(f"  cache      {config['cache_dir']}")
    print(f"  config     {config_file} (hidden from git by .git/info/exclude)")
    print(f"  start-up   {pth}")
    if others:
        print(f"  also       {', '.join(others)} (applied before; each keeps its own settings and scripts)")
    print(f"Run the upstream commands as usual; {activation.ENV_DISABLE}=1 runs vanilla; "
          f"undo with: {PROG} --remove {config['method']} {state.root}")


# --- remove -------------------------------------------------------------------------------------


def _remove(args: argparse.Namespace) -> int:
    locks = load_lock()
    method = args.method.lower()
    if method not in locks:
        raise DiReInputError(f"unknown method {args.method!r}: choose one of {', '.join(locks)}")
    resolved = Path(args.path).expanduser().resolve()
    registered = str(resolved) in activation.applied_checkouts()
    if not resolved.exists() and registered:
        activation.unregister_checkout(resolved)
        print(f"{resolved} no longer exists; removed it from the start-up list")
        return 0
    root, repo = open_repo(resolved)
    repo.close()
    folder = root / activation.CONFIG_DIR
    if not folder.is_dir() and not registered:
        raise DiReInputError(f"DiRe is not applied to {root} (no {activation.CONFIG_DIR}/ folder): nothing to remove")
    with locked(root):
        note = activation.migrate_legacy_config(root)
        if note:
            print(note)
        methods = activation.applied_methods(root)
        if methods and method not in methods:
            others = ", ".join(methods)
            raise DiReInputError(f"{root} has DiRe applied for {others}, not {method}: run {PROG} --remove "
                                 f"{methods[0]} {root}")
        config = _readable_config(root, method) or {}
        activation.remove_config(root, method)
        left = [m for m in methods if m != method]
        if not left:
            unhide_config_dir(root, _readable_exclude_record(root))
            shutil.rmtree(folder, ignore_errors=True)
            # Inside the lock: an apply waiting on it must find the checkout unregistered, then register it again.
            activation.unregister_checkout(root)
    if left:
        print(f"DiRe removed from {root} for {method}; still applied for {', '.join(left)} "
              f"(undo with {PROG} --remove {left[0]} {root})")
        return 0
    print(f"DiRe removed from {root} ({method}): config, cache and start-up entry are gone")
    cache = config.get("cache_dir")
    if cache and not Path(cache).resolve().is_relative_to(root / activation.CONFIG_DIR) and Path(cache).exists():
        print(f"  the cache outside the checkout is left in place: {cache}")
    return 0


# --- reports ------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    locks = load_lock()
    width = max(map(len, list(locks) + list(METHODS)))
    for name, lock in locks.items():
        supported = name in METHODS
        print(f"{name:<{width}}  {'supported' if supported else 'not yet':<9}  {lock.repository} @ {lock.commit}")
        if supported:
            module = load_method(name)
            for script in module.SCRIPTS:
                print(f"{'':<{width}}    {script}")
            print(f"{'':<{width}}    default weight: {module.DEFAULT_WEIGHTS.describe()}")
    for name in METHODS:
        if name not in locks:
            print(f"{name:<{width}}  {'not yet':<9}  (not pinned in upstream.lock)")
    return 0


def _status(args: argparse.Namespace) -> int:
    roots = activation.applied_checkouts()
    where = activation.site_dir() / activation.PTH_NAME
    try:
        if activation.refresh_startup_line():
            print(f"start-up line in {where} was written by an older dire-plugin: rewritten")
    except OSError as exc:  # a report still reports; the stale line is named instead
        print(f"start-up line in {where} was written by an older dire-plugin and cannot be rewritten "
              f"({exc.strerror or exc}): run dire-apply --status with write access to it")
    if not roots:
        print(f"DiRe is not applied to any checkout (start-up file: {where})")
        return 0
    print(f"DiRe is applied to {len(roots)} checkout(s) (start-up file: {where}):")
    for root in roots:
        if not Path(root).is_dir():
            print(f"  {root}: checkout missing; forget it with {PROG} --remove METHOD {root}")
            continue
        methods = activation.applied_methods(root)
        if not methods:
            print(f"  {root}: config missing; forget it with {PROG} --remove METHOD {root}")
        for method in methods:
            try:
                config = activation.read_config(root, method) or {}
            except DiReInputError as e:
                print(f"  {root}: {method}: {e}; undo with {PROG} --remove {method} {root}")
                continue
            weights = (f"share {config['share']}" if config.get("share") is not None
                       else f"r_c {config.get('r_c')}, r_e {config.get('r_e')}")
            print(f"  {root}: {method} @ {config.get('commit')}, config present "
                  f"({weights}, applied {config.get('applied_at')})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    lock, module = _supported(args.method)
    smoke = None
    if args.smoke:
        smoke = importlib.import_module("dire_plugin.upstream.smoke")
    state = survey_checkout(args.path, lock)
    ok = _print_report(state, module, args.allow_drift)
    if smoke is None:
        return 0 if ok else 1
    if state.drift:
        print("smoke run skipped: the patch does not fit changed targets")
        return 1
    config = activation.read_config(state.root, lock.method) or _config(
        args, lock, module, state.root, state.head,
        existing_dir(args.real_data, "--real-data") if args.real_data else None, _cache_dir(args.cache_dir),
    )
    if args.share is not None or any(getattr(args, k) is not None for k in (*WEIGHT_OPTIONS, "components")):
        config = {**config, **_weights(args, module)}  # weights given here override an applied config's
    result = smoke.run_smoke(lock.method, state.root, config)
    return max(0 if ok else 1, result)


def _print_report(state: CheckoutState, module: ModuleType, allow_drift: bool) -> bool:
    """Print the --verify report; True when the checkout may be applied as it is."""
    n_targets = len(module.TARGETS)
    print(f"{state.method} at {state.root}")
    print(f"  remote        {state.remote[0]} = {state.remote[1]}")
    pin = "the pinned commit" if state.at_pin else f"differs from the pinned {state.pinned}"
    print(f"  commit        {state.head} ({pin})")
    if state.dirty:
        print(f"  work tree     {len(state.dirty)} uncommitted or untracked path(s): {', '.join(state.dirty[:5])}"
              f"{' ...' if len(state.dirty) > 5 else ''} (dire-apply refuses a dirty tree)")
    else:
        print("  work tree     clean")
    drifted = {(d.file, d.symbol): d for d in state.drift}
    print(f"  fingerprints  {n_targets - len(drifted)} of {n_targets} match")
    for target in module.TARGETS:
        drift = drifted.get((target.file, target.symbol))
        if drift is None:
            print(f"    ok       {target.file}::{target.symbol}")
        elif drift.reason == "changed":
            print(f"    CHANGED  {drift.target} (pinned {drift.expected}, found {drift.actual})")
        else:
            print(f"    MISSING  {drift.target} ({drift.reason})")
    ok = not state.drift and not state.dirty and (state.at_pin or allow_drift)
    if ok:
        print("result: OK" + ("" if state.at_pin else " with --allow-drift (every fingerprint matches)"))
    elif state.drift:
        print(f"result: DRIFT: changed targets: {state.changed_targets()}")
    elif state.dirty:
        print("result: DIRTY: dire-apply refuses a tree with uncommitted or untracked files (commit or stash them)")
    else:
        print("result: DRIFT: another commit, but every fingerprint matches: apply with --allow-drift")
    return ok


# --- entry point --------------------------------------------------------------------------------


def _dispatch(args: argparse.Namespace) -> int:
    command = _remove if args.remove else _list if args.list else _status if args.status else _verify if args.verify else _apply
    return command(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``dire-apply`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return run_main(PROG, build_parser(), argv, _dispatch, _check_combination)



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
