"""Fingerprints of upstream symbols, and the lock that pins them."""
import os
from pathlib import Path
from types import SimpleNamespace

import git
import pytest

from dire_plugin import DiReInputError
from dire_plugin.upstream.lockfile import (
    ENV_LOCK,
    Drift,
    FingerprintError,
    LockError,
    MethodLock,
    check_fingerprints,
    check_patch_matches_lock,
    fingerprint_symbol,
    format_lock,
    load_lock,
    lock_path,
    method_lock,
    parse_lock,
)
from dire_plugin.hooks.declare import Target
from dire_plugin.hooks.registry import METHODS, load_method

ROOT = Path(__file__).resolve().parents[2]

SOURCE = '''\
import torch


def get_images(args, model, hook, ipc_id):
    """Synthesise one batch."""
    inputs = torch.randn(args.batch, 3, 32, 32)
    for it in range(args.iterations):
        loss = model(inputs).sum() + 0.01 * hook.r_feature
        loss.backward()
    return inputs


class BNFeatureHook:
    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, inputs, output):
        self.r_feature = inputs[0].mean()
'''


def _fp(tmp_path, source, symbol, name="mod.py"):
    path = tmp_path / name
    path.write_text(source)
    return fingerprint_symbol(path, symbol)


@pytest.fixture(autouse=True)
def _shipped_lock(monkeypatch):
    monkeypatch.delenv(ENV_LOCK, raising=False)


# --- fingerprint_symbol --------------------------------------------------------------------------


def test_fingerprint_is_short_hex(tmp_path):
    fp = _fp(tmp_path, SOURCE, "get_images")
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_fingerprint_algorithm_is_pinned(tmp_path):
    # Shipped locks hold these hashes: changing the canonical form silently invalidates all of them.
    assert _fp(tmp_path, "def f(a, b=1):\n    return a + b\n", "f") == "bc1c138d9e6600e5"


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.replace("    ", "        "),  # re-indented
        lambda s: s.replace("loss = model(inputs).sum() + 0.01 * hook.r_feature",
                            "loss = (model(inputs).sum()\n                + 0.01*hook.r_feature)  # BN prior"),
        lambda s: "# a header comment\n\n\n" + s.replace("\n\n\nclass", "\n# moved\n\n\n\n\nclass"),
        lambda s: s.replace("def get_images", "def unrelated():\n    pass\n\n\ndef get_images"),  # lines move
        lambda s: s.replace('"""Synthesise one batch."""', "'''Synthesise one batch.'''"),
        lambda s: s.replace("(args, model, hook, ipc_id)", "(\n    args,\n    model,\n    hook,\n    ipc_id,\n)"),
    ],
    ids=["indent", "wrap-and-comment", "comments-and-blank-lines", "moved", "quote-style", "trailing-comma"],
)
def test_fingerprint_ignores_layout(tmp_path, edit):
    edited = edit(SOURCE)
    assert edited != SOURCE
    for symbol in ("get_images", "BNFeatureHook", "BNFeatureHook.hook_fn"):
        assert _fp(tmp_path, edited, symbol, "b.py") == _fp(tmp_path, SOURCE, symbol, "a.py"), symbol


@pytest.mark.parametrize(
    "old, new, changed",
    [
        ("0.01 * hook", "0.1 * hook", {"get_images"}),
        ("loss.backward()", "loss.backward(retain_graph=True)", {"get_images"}),
        ("ipc_id):", "ipc_index):", {"get_images"}),
        ("inputs[0].mean()", "inputs[0].var()", {"BNFeatureHook", "BNFeatureHook.hook_fn"}),
        ("self.hook = ", "self.handle = ", {"BNFeatureHook"}),
    ],
)
def test_fingerprint_follows_code_changes(tmp_path, old, new, changed):
    edited = SOURCE.replace(old, new)
    for symbol in ("get_images", "BNFeatureHook", "BNFeatureHook.hook_fn"):
        same = _fp(tmp_path, edited, symbol, "b.py") == _fp(tmp_path, SOURCE, symbol, "a.py")
        assert same == (symbol not in changed), symbol


def test_method_and_class_fingerprints_differ(tmp_path):
    assert _fp(tmp_path, SOURCE, "BNFeatureHook") != _fp(tmp_path, SOURCE, "BNFeatureHook.hook_fn")


def test_last_definition_wins_as_at_run_time(tmp_path):
    redefined = SOURCE + "\n\ndef get_images(*args):\n    return None\n"
    assert _fp(tmp_path, redefined, "get_images") != _fp(tmp_path, SOURCE, "get_images", "b.py")
    assert _fp(tmp_path, redefined, "get_images") == _fp(tmp_path, "def get_images(*args):\n    return None\n", "get_images", "c.py")


@pytest.mark.parametrize("symbol", ["missing", "hook_fn", "BNFeatureHook.missing", "get_images.inputs", "torch"])
def test_missing_symbol_is_an_input_error(tmp_path, symbol):
    # Nested and imported names are not top-level definitions.
    with pytest.raises(FingerprintError, match="defines no top-level") as info:
        _fp(tmp_path, SOURCE, symbol)
    assert isinstance(info.value, DiReInputError) and info.value.reason == "symbol missing"


def test_missing_file_and_bad_python_are_input_errors(tmp_path):
    with pytest.raises(FingerprintError, match="no file") as info:
        fingerprint_symbol(tmp_path / "absent.py", "f")
    assert info.value.reason == "file missing"
    with pytest.raises(FingerprintError, match="not valid Python"):
        _fp(tmp_path, "def f(:\n", "f")


def test_invalid_escapes_in_old_code_are_fine(tmp_path):
    assert _fp(tmp_path, 'def f():\n    return "\\d+"\n', "f")


# --- the lock ------------------------------------------------------------------------------------


def test_shipped_lock_parses_and_pins_every_method():
    locks = load_lock()
    assert list(locks) == ["sre2l", "cda", "dwa", "mtt", "dm", "delt", "prism", "gvbsm", "edc", "infer"]
    for lock in locks.values():
        assert lock.repository.startswith("https://github.com/")
        assert len(lock.commit) == 40 and int(lock.commit, 16) >= 0
    for lock in locks.values():  # a method without a patch yet is pinned without fingerprints
        assert bool(lock.has_patch) == bool(lock.fingerprints), lock.method
    assert locks["sre2l"].commit == locks["cda"].commit == "8d00cba364bfa34aa1f5a8107dc041ae1be8ebe6"


@pytest.mark.parametrize("name", list(METHODS))
def test_shipped_lock_covers_every_target_of_every_patch(name):
    lock = load_lock()[name]
    module = load_method(name)
    check_patch_matches_lock(lock, module)
    assert lock.scripts == tuple(module.SCRIPTS)
    # Exactly the targets: a stale entry would be checked against nothing.
    assert set(lock.fingerprints) == {(t.file, t.symbol) for t in module.TARGETS}
    assert all(len(v) == 16 for v in lock.fingerprints.values())


def test_shipped_lock_is_in_canonical_form():
    # tools/pin_upstream.py rewrites the file with format_lock: hand edits would be lost.
    text = (ROOT / "upstream.lock").read_text()
    assert format_lock(parse_lock(text).values()) == text
    assert text.startswith("# Pinned upstream repositories")


def test_env_overrides_the_shipped_lock(tmp_path, monkeypatch):
    path = tmp_path / "lock.toml"
    path.write_text(format_lock([MethodLock("sre2l", "https://example.org/a/b", "0" * 40)]))
    monkeypatch.setenv(ENV_LOCK, str(path))
    assert lock_path() == path
    assert list(load_lock()) == ["sre2l"] and method_lock("SRe2L").repository == "https://example.org/a/b"
    with pytest.raises(DiReInputError, match="unknown method 'cda': choose one of sre2l"):
        method_lock("cda")
    monkeypatch.setenv(ENV_LOCK, str(tmp_path / "absent.toml"))
    with pytest.raises(DiReInputError, match="cannot read the lock file"):
        load_lock()


@pytest.mark.parametrize(
    "text, match",
    [
        ("format = 2\n", "format 2"),
        ("[sre2l]\nrepository = 'x'\ncommit = 'y'\n", "format None"),
        ("format = 1\n[sre2l]\ncommit = 'y'\n", "no repository"),
        ("format = 1\n[sre2l]\nrepository = 'x'\ncommit = 'y'\n[sre2l.fingerprints]\n'a.py' = 'ff'\n", "FILE::SYMBOL"),
        ("format = 1\n[sre2l]\nrepository = 'x'\ncommit = 3\n", "wrong type"),
        ("format = 1\n[sre2l\n", "not valid TOML"),
    ],
)
def test_malformed_lock_is_a_lock_error(text, match):
    with pytest.raises(LockError, match=match):
        parse_lock(text)


def test_format_round_trips():
    lock = MethodLock(
        "m", "https://h/o/r", "a" * 40, ("x/*odd/run.py", 'q"uote.py'),
        {("x/*odd/run.py", "C.f"): "0123456789abcdef", ('q"uote.py', "g"): "fedcba9876543210"},
    )
    assert parse_lock(format_lock([lock])) == {"m": lock}


# --- check_fingerprints --------------------------------------------------------------------------


def _tree(tmp_path):
    """A stand-in patch module with two targets, their files, and a lock that matches them."""
    module = SimpleNamespace(
        SCRIPTS={"run.py": None},
        TARGETS=(Target("run.py", "get_images"), Target("lib/*x/utils.py", "BNFeatureHook", module="utils")),
    )
    (tmp_path / "lib" / "*x").mkdir(parents=True)
    (tmp_path / "run.py").write_text(SOURCE)
    (tmp_path / "lib" / "*x" / "utils.py").write_text(SOURCE)
    prints = {(t.file, t.symbol): fingerprint_symbol(tmp_path / t.file, t.symbol) for t in module.TARGETS}
    return module, MethodLock("sre2l", "https://h/o/r", "0" * 40, ("run.py",), prints)


def test_check_fingerprints_reports_each_kind_of_drift(tmp_path):
    module, lock = _tree(tmp_path)
    assert check_fingerprints(tmp_path, lock, module) == []
    (tmp_path / "run.py").write_text(SOURCE.replace("0.01", "0.02"))
    (drift,) = check_fingerprints(tmp_path, lock, module)
    assert (drift.target, drift.reason, drift.expected) == ("run.py::get_images", "changed", lock.fingerprints[("run.py", "get_images")])
    assert drift.actual and drift.actual != drift.expected and str(drift) == "run.py::get_images"
    (tmp_path / "run.py").write_text("x = 1\n")
    (tmp_path / "lib" / "*x" / "utils.py").unlink()
    assert [(d.reason, d.actual) for d in check_fingerprints(tmp_path, lock, module)] == [
        ("symbol missing", None), ("file missing", None)]
    assert str(Drift("a.py", "f", "00", None, "file missing")) == "a.py::f (file missing)"


def test_patch_lock_mismatch_is_a_packaging_error(tmp_path):
    module, lock = _tree(tmp_path)
    partial = MethodLock(lock.method, lock.repository, lock.commit, lock.scripts,
                         dict(list(lock.fingerprints.items())[:1]))
    with pytest.raises(LockError, match=r"no fingerprint for lib/\*x/utils.py::BNFeatureHook"):
        check_fingerprints(tmp_path, partial, module)
    other_scripts = MethodLock(lock.method, lock.repository, lock.commit, ("other.py",), lock.fingerprints)
    with pytest.raises(LockError, match="scripts"):
        check_fingerprints(tmp_path, other_scripts, module)


# --- against the real upstream (optional) --------------------------------------------------------


def _mirror_checkout(lock):
    """The clone of ``lock``'s repository in $DIRE_UPSTREAM_MIRROR (named as the repository, or
    as the method), or a skip."""
    mirror = os.environ.get("DIRE_UPSTREAM_MIRROR")
    if not mirror:
        pytest.skip("set DIRE_UPSTREAM_MIRROR to a folder holding clones of the pinned upstreams")
    for name in (lock.repository.rstrip("/").rsplit("/", 1)[-1], lock.method):
        path = Path(mirror) / name
        if (path / ".git").exists():
            return path
    pytest.skip(f"DIRE_UPSTREAM_MIRROR={mirror} holds no clone of {lock.repository}")


@pytest.mark.parametrize("name", [m for m, lock in load_lock().items() if lock.has_patch])
def test_fingerprints_match_the_real_upstream(name):
    lock = load_lock()[name]
    path = _mirror_checkout(lock)
    with git.Repo(path) as repo:
        head = repo.head.commit.hexsha
    if head != lock.commit:
        pytest.skip(f"{path} is at {head}, not the pinned {lock.commit}")
    assert check_fingerprints(path, lock) == []
