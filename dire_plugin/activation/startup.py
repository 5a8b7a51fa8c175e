"""Activation of a patch in the running process: from the ``.pth`` start-up line, from
``import dire_plugin.auto``, or from the ``dire-run`` launcher.

Kept free of heavy imports at module level: the ``.pth`` line imports this module in every
process started from a patched checkout, including ones DiRe has nothing to do with (the
squeeze and relabel scripts), and those must stay as fast as before.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .applied import (
    CONFIG_DIR,
    ENV_ACTIVATE,
    ENV_DISABLE,
    LEGACY_CONFIG,
    applied_methods,
    config_path,
    find_checkout,
    read_config,
)

__all__ = ["activate", "activate_from_startup", "disabled", "active_method"]

logger = logging.getLogger("dire")

_ACTIVE: Optional[str] = None  # method name once patched in this process
#: What a child process that multiprocessing spawns runs first (mp.spawn workers: fresh
#: interpreters that no .pth line activates where dire-apply wrote none, as under dire-run). Its
#: interpreter is complete, so torch comes first and activation follows at once, in the same order
#: as when a .pth line of an applied checkout waits for the import (that line then activates).
_CHILD_PRELUDE = ("import torch; import dire_plugin.activation.startup as _dire_startup; "
                  "_dire_startup.activate_from_startup()")


def disabled() -> bool:
    """``DIRE_DISABLE`` is on (``1/true/yes/on``): run the upstream vanilla (the baseline). Any
    value but those and ``0/false/no/off``/empty is a :class:`~dire_plugin.errors.DiReInputError`."""
    from ..io.environ import env_flag

    return env_flag(ENV_DISABLE)


def active_method() -> Optional[str]:
    """The method patched into this process, ``None`` before :func:`activate` (or when vanilla)."""
    return _ACTIVE


def _setup_logging() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _script_path() -> Optional[Path]:
    main = sys.modules.get("__main__")
    candidate = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else None)
    return Path(candidate).resolve() if candidate else None


def _checkout_settings(script: Path) -> Optional[Dict[str, Any]]:
    """The settings of the applied method that covers ``script`` in its checkout, if any."""
    from ..errors import DiReHookError
    from ..hooks.registry import load_method

    root = find_checkout(script)
    if root is None:
        return None
    methods = applied_methods(root)
    if not methods:
        raise DiReHookError(
            f"{root / CONFIG_DIR / LEGACY_CONFIG} was written by an older dire-plugin: re-run "
            f"dire-apply METHOD {root} --real-data DIR (or remove it with dire-apply --remove METHOD {root})"
        )
    rel = script.relative_to(root).as_posix()
    for method in methods:
        if rel in load_method(method).SCRIPTS:
            config = read_config(root, method) or {}
            return {**config, "method": method, "root": str(root), "script": rel,
                    "_source": str(config_path(root, method))}
    return {"method": methods[0], "root": str(root), "script": rel, "_source": ""}  # not covered: vanilla


def _settings_for(script: Optional[Path], overrides: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Settings of the run: the inherited ``DIRE_ACTIVATE`` of a parent, else the settings of the
    applied method covering the script, with ``overrides`` (launcher flags) on top."""
    inherited = os.environ.get(ENV_ACTIVATE)
    if inherited:
        try:
            data = json.loads(inherited)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            from ..errors import DiReInputError

            raise DiReInputError(f"{ENV_ACTIVATE} does not hold the JSON settings of a run: unset it")
        return {**data, "_source": ENV_ACTIVATE, "_inherited": True, **(overrides or {})}
    config = _checkout_settings(script) if script is not None else None
    if config is None:
        return None if overrides is None else {**overrides, "_source": "dire-run"}
    if overrides:
        return {**config, **overrides, "_source": "dire-run" + (f" and {config['_source']}" if config["_source"] else "")}
    return config


def _check_inputs(settings: Dict[str, Any], spec: Any, argv: List[str]) -> None:
    """The run's data and cache, checked before the script does any work (a parent of an
    inherited run has checked them already)."""
    from ..errors import DiReInputError
    from .checks import check_cache_dir, check_real_data_for_script

    where = settings.get("_source") or "the settings"
    if not settings.get("real_data"):
        raise DiReInputError(
            f"no real data for DiRe in {where}: pass --real-data DIR to dire-apply or dire-run"
        )
    check_real_data_for_script(settings["real_data"], spec.for_argv(argv))
    if settings.get("cache_dir"):
        check_cache_dir(settings["cache_dir"], f"cache folder (from {where})")


def activate(script: Optional[os.PathLike] = None, overrides: Optional[Dict[str, Any]] = None, required: bool = False,
             argv: Optional[List[str]] = None) -> Optional[str]:
    """Patch this process for ``script`` (default: the running ``__main__``); idempotent.

    ``argv`` are the script's arguments (default ``sys.argv[1:]``): ``dire-run`` activates before
    it hands ``sys.argv`` to the script, and the real-data check reads the dataset from them.

    Returns the method name when DiRe is active, ``None`` when this script is not covered or
    ``DIRE_DISABLE`` is set. With ``required``, a script without settings is an error (the user
    asked for DiRe explicitly). Raises :class:`~dire_plugin.errors.DiReError` subclasses.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    from ..errors import DiReHookError
    from ..hooks.registry import load_method

    _setup_logging()
    path = Path(script).resolve() if script is not None else _script_path()
    # A child of an active run (``-c``/spawn, no script path) has the inherited settings.
    settings = _settings_for(path, overrides) if path is not None or os.environ.get(ENV_ACTIVATE) else None
    if settings is None or not settings.get("method"):
        if required:
            raise DiReHookError(
                f"no DiRe settings for {path}: run 'dire-apply METHOD CHECKOUT --real-data DIR' first, or use dire-run"
            )
        return None
    method = load_method(settings["method"])
    rel = settings.get("script", "")
    if rel not in method.SCRIPTS:
        if required:
            raise DiReHookError(f"{rel or path} is not a script the {settings['method']} patch covers")
        return None  # squeeze/relabel/validate scripts of an applied checkout: nothing to do
    commit = settings.get("commit", "")
    from ..io.environ import env_flag
    from ..upstream import shim

    off = disabled()  # both flags read before either acts: a bad value changes nothing
    if env_flag(shim.ENV_SHIM):  # vanilla dry runs on a laptop need it as much as DiRe ones
        shim.install()
    if off:
        logger.info("[dire] %s=%s: %s runs vanilla (upstream %s)", ENV_DISABLE, os.environ[ENV_DISABLE],
                    settings["method"], commit)
        return None
    from ..hooks.settings import RunConfig
    from .checks import check_environment

    if not any(key in settings for key in ("r_c", "r_e", "share")):  # no weight given anywhere: the method's own
        settings = {**method.DEFAULT_WEIGHTS.settings(), **settings}
    source = settings.get("_source") or "the settings"
    config = RunConfig.from_dict({**settings, "script": rel}, where=f"{source}: ")
    check_environment()
    if not settings.get("_inherited"):
        _check_inputs(settings, method.SCRIPTS[rel], sys.argv[1:] if argv is None else argv)
    root = settings.get("root")
    # Our own scripts (the demo) have no upstream commit to be checked against.
    if root and settings.get("verify", True) and getattr(method, "PINNED", True):
        _verify_targets(settings["method"], Path(root), rel)
    # Children (mp.spawn, DataLoader workers started with spawn) have no script path to match:
    # they inherit the settings instead, and spawned ones run the prelude that reads them.
    os.environ[ENV_ACTIVATE] = json.dumps({**{k: v for k, v in settings.items() if not k.startswith("_")}, "script": rel})
    method.patch(config, root=root)
    _ACTIVE = settings["method"]
    from ..upstream import children

    children.add_prelude("activate", _CHILD_PRELUDE)
    share = "" if config.share is None else f", share={config.share:g} (weights calibrated on the first synthesis steps)"
    logger.info(
        "[dire] %s patch active: r_c=%g, r_e=%g%s, reduction=%s, upstream %s",
        _ACTIVE, config.r_c, config.r_e, share, config.reduction, commit or "unpinned",
    )
    return _ACTIVE


def _verify_targets(method: str, root: Path, script: str) -> None:
    """Refuse to run when a symbol this script's hooks rely on changed since ``dire-apply``."""
    from ..errors import DiReHookError
    from ..upstream.lockfile import check_fingerprints, method_lock

    folder = script.rsplit("/", 1)[0] if "/" in script else ""
    lock = method_lock(method)
    for drift in check_fingerprints(root, lock):
        same_folder = (drift.file.rsplit("/", 1)[0] if "/" in drift.file else "") == folder
        if drift.file == script or same_folder:
            raise DiReHookError(
                f"{drift.file}: {drift.symbol} {drift.reason}; the {method} patch is pinned to upstream commit "
                f"{lock.commit} (DIRE_DISABLE=1 runs vanilla; dire-apply --verify {method} {root} shows all changes)"
            )


class _AfterImport:
    """A meta-path finder that runs ``callback`` right after module ``name`` has been executed.

    The ``.pth`` line runs while ``site`` is still building ``sys.path``: in a venv made with
    ``--system-site-packages`` (common on clusters), torch and wrapt are not importable yet.
    Waiting for the script's own ``import torch`` finds the path complete, and the patch is
    still in place before the script uses anything. Standard library only, like wrapt's
    post-import hooks (which cannot be imported at that point either).
    """

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback, self.busy = name, callback, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self.busy:
            return None
        import importlib.util

        self.busy = True  # let the other finders locate the real module
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, finder = spec.loader, self
        original = loader.exec_module

        def exec_module(module):
            original(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            finder.callback()

        loader.exec_module = exec_module
        return spec


def _activate_or_exit() -> None:
    """Never let a traceback out, never go on without DiRe once the user asked for it."""
    try:
        activate()
    except Exception as e:  # noqa: BLE001 - anything here must stop the run, not be swallowed
        from ..errors import DiReError

        detail = str(e) if isinstance(e, DiReError) else f"{type(e).__name__}: {e}"
        print(f"dire: error: {detail}", file=sys.stderr, flush=True)
        os._exit(2)


def activate_from_startup() -> None:
    """Entry point of the ``.pth`` line: activate once the script imports torch."""
    if "torch" in sys.modules:
        _activate_or_exit()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("torch", _activate_or_exit))
