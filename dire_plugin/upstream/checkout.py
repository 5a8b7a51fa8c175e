"""Is a folder an upstream checkout that a patch can be applied to?

:func:`survey_checkout` answers the structural questions (a git work-tree root with the pinned
repository as a remote) and records the rest (commit, uncommitted changes, fingerprint drift) in
a :class:`CheckoutState`; :func:`inspect_checkout` also refuses what ``dire-apply`` must not
apply to. Every refusal is a one-line :class:`DiReInputError` saying what to do.

:func:`hide_config_dir` / :func:`unhide_config_dir` keep our ``.dire/`` folder out of
``git status`` through ``.git/info/exclude`` and take the line out again byte for byte.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..errors import DiReInputError
from .lockfile import Drift, MethodLock, check_fingerprints

if TYPE_CHECKING:  # the annotations only: importing git costs 0.2 s that most commands never need
    import git

__all__ = [
    "CONFIG_DIR",
    "EXCLUDE_LINE",
    "CheckoutState",
    "git_reason",
    "hide_config_dir",
    "inspect_checkout",
    "normalize_remote_url",
    "open_repo",
    "survey_checkout",
    "unhide_config_dir",
]

#: The folder dire-plugin keeps in a checkout (its settings and cache), hidden from git by
#: :data:`EXCLUDE_LINE`; everything else in the checkout stays as upstream made it.
CONFIG_DIR = ".dire"

# Hosts whose owner/repository names are case-insensitive (the same repository either way).
_CASE_INSENSITIVE_HOSTS = {"github.com", "gitlab.com", "bitbucket.org"}
_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>(?!/).*)$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://(?:[^@/]+@)?(?P<host>[^/:]+)(?::\d+)?(?P<path>/.*)?$", re.I)


def normalize_remote_url(url: str) -> str:
    """``host/owner/name`` for a git remote URL, so https, ssh and scp-like spellings compare equal:
    ``git@github.com:VILA-Lab/SRe2L.git`` and ``https://github.com/VILA-Lab/SRe2L/`` both give
    ``github.com/VILA-Lab/SRe2L``. Anything else (a local path) is returned stripped."""
    url = url.strip()
    match = _URL.match(url) or (None if "://" in url else _SCP_LIKE.match(url))
    if match is None:
        return url.rstrip("/")
    host = match.group("host").lower()
    path = (match.group("path") or "").strip("/")
    if path.endswith(".git"):
        path = path[: -len(".git")]
    if host in _CASE_INSENSITIVE_HOSTS:
        path = path.lower()
    return f"{host}/{path}"


@dataclass
class CheckoutState:
    """What :func:`survey_checkout` found in a checkout."""

    root: Path
    method: str
    head: str
    pinned: str
    #: Name and URL of the remote that matches the lock's repository.
    remote: Tuple[str, str]
    #: Paths (relative to ``root``) with uncommitted changes or untracked, ``.dire/`` left out.
    dirty: List[str] = field(default_factory=list)
    drift: List[Drift] = field(default_factory=list)

    @property
    def at_pin(self) -> bool:
        return self.head == self.pinned

    def changed_targets(self) -> str:
        """The drifted targets, comma-separated, or ``none changed``."""
        return ", ".join(str(d) for d in self.drift) or "none changed"

    def require_applicable(self, allow_drift: bool = False) -> None:
        """Raise :class:`DiReInputError` unless a patch may be applied to this checkout."""
        if self.dirty:
            shown = ", ".join(self.dirty[:3]) + (f" and {len(self.dirty) - 3} more" if len(self.dirty) > 3 else "")
            raise DiReInputError(
                f"{self.root} has uncommitted changes or untracked files ({shown}); the pin and "
                "fingerprints are checked on committed code: commit or stash them (git stash -u), then retry"
            )
        where = f"checkout is at {self.head}, dire-plugin is pinned to {self.pinned} for {self.method}"
        if self.drift:
            advice = f"check out the pinned commit (git -C {self.root} checkout {self.pinned})"
            if self.at_pin:
                advice = "the lock does not describe this commit: reinstall dire-plugin"
            elif allow_drift:
                advice = f"--allow-drift only applies when every fingerprint still matches; {advice}"
            else:
                advice += "; --allow-drift only applies when every fingerprint still matches"
            raise DiReInputError(f"{where}; changed targets: {self.changed_targets()}; {advice}")
        if not self.at_pin and not allow_drift:
            raise DiReInputError(
                f"{where}; changed targets: none changed; use --allow-drift if every fingerprint still "
                f"matches (it does here), or check out the pinned commit"
            )


def open_repo(path: os.PathLike) -> Tuple[Path, git.Repo]:
    """The resolved ``path`` and its repository; ``path`` must be the root of a git work tree."""
    import git  # 0.2 s: only the commands that look at a checkout pay for it

    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DiReInputError(f"{root} does not exist: give the folder of an upstream clone (or add --clone)")
    if not root.is_dir():
        raise DiReInputError(f"{root} is not a directory: give the folder of an upstream clone")
    try:
        repo = git.Repo(root, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise DiReInputError(f"{root} is not inside a git repository: give the folder of a git clone of the upstream") from None
    if repo.bare or repo.working_tree_dir is None:
        raise DiReInputError(f"{root} is a bare git repository: give the folder of a checkout with a work tree")
    top = Path(repo.working_tree_dir).resolve()
    if top != root:
        # Script paths and fingerprints are relative to the repository root.
        raise DiReInputError(f"{root} is a subfolder of the git repository at {top}: give the repository root {top}")
    return root, repo


def _matching_remote(repo: git.Repo, root: Path, repository: str) -> Tuple[str, str]:
    wanted = normalize_remote_url(repository)
    seen = []
    for remote in repo.remotes:
        for url in remote.urls:
            if normalize_remote_url(url) == wanted:
                return remote.name, url
            seen.append(f"{remote.name}={url}")
    found = "; its remotes are " + ", ".join(seen) if seen else "; it has no remote"
    raise DiReInputError(
        f"{root} is not a clone of {repository}{found}: clone {repository} "
        f"(or add it: git -C {root} remote add upstream {repository})"
    )


def _head(repo: git.Repo, root: Path) -> str:
    try:
        return repo.head.commit.hexsha
    except ValueError:  # an unborn branch: nothing committed yet
        raise DiReInputError(f"{root} has no commit checked out: clone the upstream repository there") from None


def git_reason(exc: git.GitCommandError) -> str:
    """The last line git printed on stderr, without GitPython's ``stderr: '...'`` wrapping."""
    text = str(exc.stderr or "").strip()
    if text.startswith("stderr:"):
        text = text[len("stderr:"):].strip()
    text = text.strip("'\"").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("'\"")]
    return lines[-1] if lines else f"git exited with status {exc.status}"


def _is_bytecode(path: str) -> bool:
    # Python writes __pycache__/ beside every upstream module a run imports (vanilla runs too):
    # generated, never read by the fingerprints, not a change to the code.
    return "__pycache__/" in path or path.endswith((".pyc", ".pyo"))


def _dirty_paths(repo: git.Repo) -> List[str]:
    """Changed, staged and untracked paths, leaving out our own ``.dire/`` folder and Python's
    bytecode caches.

    ``.git/info/exclude`` hides ``.dire/`` once applied, but not before (or if a user edits it).
    """
    out = repo.git.status("--porcelain=v1", "-z", "--untracked-files=normal")
    entries = out.split("\0")
    paths = []
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        status, path = entry[:2], entry[3:]
        if "R" in status or "C" in status:
            i += 1  # renames and copies carry their source path as the next entry
        if path == CONFIG_DIR or path.startswith(CONFIG_DIR + "/") or (status == "??" and _is_bytecode(path)):
            continue
        paths.append(path)
    return paths


def survey_checkout(path: os.PathLike, lock: MethodLock) -> CheckoutState:
    """Check that ``path`` is a clone of the lock's repository (raising :class:`DiReInputError`
    if not) and record its commit, uncommitted changes and fingerprint drift."""
    root, repo = open_repo(path)
    with repo:
        remote = _matching_remote(repo, root, lock.repository)
        head = _head(repo, root)
        dirty = _dirty_paths(repo)
    drift = check_fingerprints(root, lock)
    return CheckoutState(root, lock.method, head, lock.commit, remote, dirty, drift)


def inspect_checkout(path: os.PathLike, lock: MethodLock, *, allow_drift: bool = False) -> CheckoutState:
    """:func:`survey_checkout`, then refuse a dirty tree, another commit (unless ``allow_drift``)
    and any changed fingerprint."""
    state = survey_checkout(path, lock)
    state.require_applicable(allow_drift)
    return state


# --- hiding .dire/ from git ----------------------------------------------------------------------

#: The line ``dire-apply`` adds to ``.git/info/exclude``: the config folder at the root only.
EXCLUDE_LINE = f"/{CONFIG_DIR}/"


def _exclude_path(root: Path) -> Path:
    import git

    # --git-path follows worktrees and $GIT_DIR; a linked worktree shares the main exclude file.
    with git.Repo(root) as repo:
        rel = repo.git.rev_parse("--git-path", "info/exclude")
    return (root / rel).resolve()


def hide_config_dir(root: os.PathLike, previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Add :data:`EXCLUDE_LINE` to ``.git/info/exclude`` unless it is there; returns the record
    :func:`unhide_config_dir` needs to undo exactly that (stored in the config).

    ``previous`` is the record of an earlier apply: re-applying keeps it, so a line we added
    the first time is still ours to remove.
    """
    path = _exclude_path(Path(root))
    try:
        data: Optional[bytes] = path.read_bytes()
    except FileNotFoundError:
        data = None
    if data is not None and EXCLUDE_LINE.encode() in data.splitlines():
        return dict(previous) if previous and previous.get("added") else {"added": False}
    dir_created = not path.parent.exists()
    separator = b"\n" if data and not data.endswith(b"\n") else b""
    appended = separator + EXCLUDE_LINE.encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((data or b"") + appended)
    return {"added": True, "created": data is None, "dir_created": dir_created, "appended": appended.decode()}


def unhide_config_dir(root: os.PathLike, record: Optional[Dict[str, Any]]) -> None:
    """Undo :func:`hide_config_dir` given its record, leaving the file as it was before."""
    if not record or not record.get("added"):
        return
    path = _exclude_path(Path(root))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    appended = str(record.get("appended", EXCLUDE_LINE + "\n")).encode()
    if data.endswith(appended):
        data = data[: len(data) - len(appended)]
    else:  # edited since: take out our line only
        data = b"".join(l for l in data.splitlines(keepends=True) if l.rstrip(b"\r\n") != EXCLUDE_LINE.encode())
    if record.get("created") and not data:
        path.unlink()
        if record.get("dir_created"):
            try:
                path.parent.rmdir()
            except OSError:  # something else lives there now
                pass
    else:
        path.write_bytes(data)
