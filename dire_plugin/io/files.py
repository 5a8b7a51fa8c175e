"""Files we read and write: torch files loaded as data only, writes that readers never see half
done, and a lock for files several processes edit.

* :func:`load_torch_file`: ``torch.load(weights_only=True)`` on the CPU; any failure is one
  :class:`~dire_plugin.errors.DiReInputError` line naming the file and what is wrong with it
  (never torch's own advice to turn ``weights_only`` off).
* :func:`atomic_write` / :func:`atomic_torch_save`: a temporary file of this process's own in the
  same folder, flushed, then renamed over the target.
* :func:`locked`: an exclusive ``flock`` on a folder around a read-modify-write in it.

torch is imported only by the torch functions: the start-up path uses the other two.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from ..errors import DiReInputError

__all__ = ["atomic_torch_save", "atomic_write", "load_torch_file", "locked", "torch_file_problem"]

PathLike = Union[str, "os.PathLike[str]"]


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back, once, before threads start
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _write_via_temp(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename; a name of this process's own, so concurrent writers
    # never truncate each other's temporary file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file owner-only; a plain open would follow the umask. The .pth line in a
        # shared environment must stay readable by every user, or their runs go quietly vanilla.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    _write_via_temp(path, lambda f: f.write(payload))
    return path


def atomic_torch_save(path: PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    path = Path(path)
    _write_via_temp(path, lambda f: torch.save(obj, f))
    return path


@contextlib.contextmanager
def locked(folder: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the directory ``folder`` (created if needed) for the block.

    POSIX ``flock`` on the folder itself: no lock file is left behind in site-packages or in a
    user's checkout, and the kernel releases the lock when the process dies, so a killed writer
    never leaves a stale one. Where ``fcntl`` does not exist the block runs unlocked.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def torch_file_problem(path: Path, error: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, in our words (torch's advice to load with
    ``weights_only=False`` is never passed on)."""
    text = str(error)
    if "Unsupported global" in text or "GLOBAL" in text:
        return ("it holds pickled Python objects, not only tensors; dire-plugin loads such files as data "
                "and never runs code from them")
    try:
        size = path.stat().st_size
    except OSError as e:
        return e.strerror or str(e)
    if size == 0:
        return "the file is empty"
    # torch reports a cut-off archive as anything from EOFError to OSError(22, "Invalid argument").
    if not zipfile.is_zipfile(path):
        return "it is truncated or not a file written by torch.save"
    if isinstance(error, OSError) and not isinstance(error, zipfile.BadZipFile) and error.errno not in (None, 22):
        return error.strerror or str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if isinstance(error, OSError) or "weights_only" in first or "download" in first:
        return "it is truncated or damaged"
    return first


def load_torch_file(path: PathLike, what: str = "file", allow: Iterable[type] = (), mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; ``allow`` names the classes
    beyond tensors and containers a file may hold (e.g. ``argparse.Namespace``). ``mmap``: map
    the tensors' storage from the file instead of reading it (a 650 MB MTT expert buffer of which
    one epoch is used); a file in torch's legacy format is read as usual.

    Raises :class:`DiReInputError` ``"cannot load WHAT PATH: REASON"`` when the file is missing,
    truncated, not a torch file or holds anything else.
    """
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise DiReInputError(f"cannot load {what} {p}: {'it is not a file' if p.exists() else 'no such file'}")
    allow = list(allow)
    extra = {"mmap": True} if mmap and zipfile.is_zipfile(p) else {}
    try:
        safe = getattr(torch.serialization, "safe_globals", None)
        if allow and safe is not None:
            with safe(allow):  # the allowance stays local to this load (torch >= 2.5)
                return torch.load(p, map_location="cpu", weights_only=True, **extra)
        if allow:
            torch.serialization.add_safe_globals(allow)
        return torch.load(p, map_location="cpu", weights_only=True, **extra)
    except Exception as e:  # unpickling errors come in many types; all mean "not loadable as data"
        raise DiReInputError(f"cannot load {what} {p}: {torch_file_problem(p, e)}") from None
