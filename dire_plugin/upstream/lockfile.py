"""``upstream.lock``: the upstream commit each patch was written for, and fingerprints of the
upstream symbols it relies on.

A fingerprint hashes a canonical dump of a symbol's syntax tree, so reformatting, comments and
moved lines leave it unchanged while any change to the code changes it. ``dire-apply`` compares
them with a user's checkout before applying, which is what makes ``--allow-drift`` safe: a newer
commit is accepted only if nothing a patch depends on has changed.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ..errors import DiReError, DiReInputError

__all__ = [
    "ENV_LOCK",
    "FORMAT",
    "FINGERPRINT_CHARS",
    "Drift",
    "FingerprintError",
    "LockError",
    "MethodLock",
    "check_fingerprints",
    "check_patch_matches_lock",
    "fingerprint_symbol",
    "format_lock",
    "load_lock",
    "lock_path",
    "parse_lock",
    "method_lock",
]

#: Path of a lock file that replaces the shipped one (tests pin look-alike repositories with it).
ENV_LOCK = "DIRE_UPSTREAM_LOCK"
FORMAT = 1
#: 64 bits of sha256: collisions by accident are out of reach, and the lock stays readable.
FINGERPRINT_CHARS = 16

HEADER = """\
# Pinned upstream repositories, one table per method; written by tools/pin_upstream.py.
#
#   repository    where the upstream code lives (a user's checkout must have it as a remote)
#   commit        the commit the patch was written and verified against
#   scripts       entry scripts the patch covers (the keys of the patch module's SCRIPTS)
#   fingerprints  "FILE::SYMBOL" = first 16 hex digits of the sha256 of the symbol's syntax tree
#                 (see dire_plugin.upstream.lockfile.fingerprint_symbol): unchanged by whitespace,
#                 comments and moved lines, changed by any change to the code. Every TARGET of
#                 the patch module has one; `dire-apply --allow-drift` accepts another commit
#                 only if all of them still match.
#
# A method without scripts is pinned but has no patch yet. Regenerate a method's table from a
# clean checkout at its commit with: python tools/pin_upstream.py METHOD CHECKOUT
"""


class LockError(DiReError):
    """The lock file is malformed or does not match the patch modules: a packaging bug."""


class FingerprintError(DiReInputError):
    """The file or symbol to fingerprint does not exist (or the file is not valid Python)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        #: ``"file missing"``, ``"symbol missing"`` or ``"not valid Python"`` (for :class:`Drift`).
        self.reason = reason


@dataclass(frozen=True)
class MethodLock:
    """One method's table of the lock."""

    method: str
    repository: str
    commit: str
    #: Entry scripts the patch covers; empty while the method has no patch.
    scripts: Tuple[str, ...] = ()
    #: (file, symbol) → fingerprint.
    fingerprints: Mapping[Tuple[str, str], str] = field(default_factory=dict)

    @property
    def has_patch(self) -> bool:
        """Whether the lock pins scripts for this method (methods without a patch have none)."""
        return bool(self.scripts)


@dataclass(frozen=True)
class Drift:
    """A target whose fingerprint in a checkout differs from the lock."""

    file: str
    symbol: str
    expected: str
    actual: Optional[str]
    #: ``"changed"``, ``"symbol missing"``, ``"file missing"`` or ``"not valid Python"``.
    reason: str

    @property
    def target(self) -> str:
        return f"{self.file}::{self.symbol}"

    def __str__(self) -> str:
        return self.target if self.reason == "changed" else f"{self.target} ({self.reason})"


# --- fingerprints -------------------------------------------------------------------------------


def _canonical(node: Any) -> str:
    """A dump of an AST that is the same on every Python version this package supports.

    ``ast.dump`` is not: 3.12 added ``type_params=[]`` to every def and 3.13 stopped printing
    empty and ``None`` fields. Dropping those (and positions) leaves only what the code says.
    """
    if isinstance(node, ast.AST):
        parts = []
        for name, value in ast.iter_fields(node):
            if value is None or value == []:
                continue
            parts.append(f"{name}={_canonical(value)}")
        return f"{type(node).__name__}({', '.join(parts)})"
    if isinstance(node, list):
        return "[" + ", ".join(_canonical(item) for item in node) + "]"
    return repr(node)


def _find_symbol(tree: ast.Module, symbol: str) -> Optional[ast.AST]:
    """The top-level ``def``/``class`` ``symbol`` or method ``Class.method``; the last one wins,
    as it does when Python runs the file."""
    scope: List[ast.stmt] = tree.body
    found: Optional[ast.AST] = None
    for depth, name in enumerate(symbol.split(".")):
        found = None
        for node in scope:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                found = node
        if found is None:
            return None
        scope = found.body if isinstance(found, ast.ClassDef) else []
    return found


def fingerprint_symbol(path: os.PathLike, symbol: str) -> str:
    """Fingerprint of ``symbol`` (``name`` or ``Class.method``) defined at the top level of ``path``.

    Raises :class:`FingerprintError` when the file, or the symbol in it, does not exist.
    """
    path = Path(path)
    try:
        source = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FingerprintError(f"cannot fingerprint {symbol}: no file {path}", "file missing") from None
    try:
        with warnings.catch_warnings():
            # Old upstream code has "\d"-style escapes: a SyntaxWarning on 3.12+, not our concern.
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError) as exc:
        raise FingerprintError(f"cannot fingerprint {symbol}: {path} is not valid Python ({exc})", "not valid Python") from None
    node = _find_symbol(tree, symbol)
    if node is None:
        raise FingerprintError(f"cannot fingerprint {symbol}: {path} defines no top-level {symbol}", "symbol missing")
    return hashlib.sha256(_canonical(node).encode()).hexdigest()[:FINGERPRINT_CHARS]


# --- reading and writing the lock ---------------------------------------------------------------


def lock_path() -> Path:
    """The lock in use: ``$DIRE_UPSTREAM_LOCK`` if set, else the one shipped in the package."""
    override = os.environ.get(ENV_LOCK)
    if override:
        return Path(override)
    return Path(str(resources.files("dire_plugin") / "upstream.lock"))


def _parse_method(name: str, table: Any) -> MethodLock:
    if not isinstance(table, dict):
        raise LockError(f"upstream.lock: {name!r} is not a table")
    try:
        repository, commit = table["repository"], table["commit"]
    except KeyError as exc:
        raise LockError(f"upstream.lock: [{name}] has no {exc.args[0]}") from None
    scripts = table.get("scripts", [])
    prints = table.get("fingerprints", {})
    if not (isinstance(repository, str) and isinstance(commit, str) and isinstance(scripts, list)
            and all(isinstance(s, str) for s in scripts) and isinstance(prints, dict)):
        raise LockError(f"upstream.lock: [{name}] has values of the wrong type")
    fingerprints: Dict[Tuple[str, str], str] = {}
    for key, value in prints.items():
        file, sep, symbol = key.rpartition("::")
        if not sep or not file or not symbol or not isinstance(value, str):
            raise LockError(f"upstream.lock: [{name}.fingerprints] key {key!r} is not \"FILE::SYMBOL\" = \"HEX\"")
        fingerprints[(file, symbol)] = value
    return MethodLock(name, repository, commit, tuple(scripts), fingerprints)


def parse_lock(text: str) -> Dict[str, MethodLock]:
    """Parse the text of a lock file (format 1)."""
    # Imported here, not at module level: the .pth start-up line reaches this module (through
    # CONFIG_DIR), and there a third-party tomli on Python < 3.11 may not be importable yet.
    try:  # Python >= 3.11
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - exercised on Python < 3.11 only
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"upstream.lock is not valid TOML: {exc}") from None
    if data.get("format") != FORMAT:
        raise LockError(f"upstream.lock has format {data.get('format')!r}; this dire-plugin reads format {FORMAT}")
    return {name: _parse_method(name, table) for name, table in data.items() if name != "format"}


def load_lock() -> Dict[str, MethodLock]:
    """All methods of the lock in use (see :func:`lock_path`), in file order."""
    path = lock_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DiReInputError(f"cannot read the lock file {path} (${ENV_LOCK}?): {exc.strerror}") from None
    return parse_lock(text)


def method_lock(name: str) -> MethodLock:
    """The lock of one method; an unknown name is a one-line error listing the known ones."""
    locks = load_lock()
    lock = locks.get(name.lower()) if isinstance(name, str) else None
    if lock is None:
        raise DiReInputError(f"unknown method {name!r}: choose one of {', '.join(locks)}")
    return lock


def _toml_str(value: str) -> str:
    # A JSON string (ASCII, escaped) is a valid TOML basic string.
    return json.dumps(value)


def format_lock(locks: Iterable[MethodLock]) -> str:
    """The text of a lock file holding ``locks``, with the explanatory header."""
    out = [HEADER, f"format = {FORMAT}\n"]
    for lock in locks:
        out.append(f"\n[{lock.method}]\n")
        out.append(f"repository = {_toml_str(lock.repository)}\n")
        out.append(f"commit = {_toml_str(lock.commit)}\n")
        if lock.scripts:
            out.append("scripts = [\n" + "".join(f"    {_toml_str(s)},\n" for s in lock.scripts) + "]\n")
        if lock.fingerprints:
            out.append(f"\n[{lock.method}.fingerprints]\n")
            for (file, symbol), value in lock.fingerprints.items():
                out.append(f"{_toml_str(f'{file}::{symbol}')} = {_toml_str(value)}\n")
    return "".join(out)


# --- checking a checkout ------------------------------------------------------------------------


def _patch_module(method: str):
    from ..hooks.registry import load_method  # late: loading a patch module is cheap, but only needed here

    return load_method(method)


def check_patch_matches_lock(lock: MethodLock, module: Any = None) -> None:
    """Raise :class:`LockError` unless the lock pins exactly the patch module's scripts and a
    fingerprint for each of its targets (a mismatch means the package was released broken)."""
    module = module if module is not None else _patch_module(lock.method)
    scripts = tuple(getattr(module, "SCRIPTS", {}))
    if tuple(sorted(scripts)) != tuple(sorted(lock.scripts)):
        raise LockError(
            f"upstream.lock pins scripts {list(lock.scripts)} for {lock.method} but its patch covers "
            f"{list(scripts)}: a dire-plugin packaging bug (rerun tools/pin_upstream.py)"
        )
    missing = [f"{t.file}::{t.symbol}" for t in module.TARGETS if (t.file, t.symbol) not in lock.fingerprints]
    if missing:
        raise LockError(
            f"upstream.lock has no fingerprint for {', '.join(missing)} ({lock.method}): "
            "a dire-plugin packaging bug (rerun tools/pin_upstream.py)"
        )


def check_fingerprints(root: os.PathLike, lock: MethodLock, module: Any = None) -> List[Drift]:
    """Targets of the method's patch whose fingerprint in the checkout at ``root`` differs from
    the lock (empty when everything matches)."""
    module = module if module is not None else _patch_module(lock.method)
    check_patch_matches_lock(lock, module)
    root = Path(root)
    drifts = []
    for target in module.TARGETS:
        expected = lock.fingerprints[(target.file, target.symbol)]
        path = root / target.file  # joined, never globbed: SRe2L has a folder named "*small_dataset"
        try:
            actual: Optional[str] = fingerprint_symbol(path, target.symbol)
        except FingerprintError as exc:
            drifts.append(Drift(target.file, target.symbol, expected, None, exc.reason))
            continue
        if actual != expected:
            drifts.append(Drift(target.file, target.symbol, expected, actual, "changed"))
    return drifts
