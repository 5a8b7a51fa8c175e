"""``dire-apply`` on a look-alike of the SRe2L repository: apply/remove round trips leave the
checkout byte-identical, and every bad input is refused with exit 2, one line, and no change."""
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import git
import pytest

from dire_plugin.activation import applied as activation
from dire_plugin.upstream.checkout import normalize_remote_url
from dire_plugin.cli.apply import ENV_CLONE_URL, main
from dire_plugin.upstream.lockfile import ENV_LOCK, MethodLock, format_lock, load_lock, parse_lock
from dire_plugin.hooks.registry import load_method
from lookalike import build_checkout, commit_all, write_image_folder, write_lock

URL = "https://github.com/VILA-Lab/SRe2L"
SRE2L = load_method("sre2l")
CDA = load_method("cda")
LATER = "cvdd"  # pinned in the test's lock, with no patch (a committee method, planned)
# The first target, and a file no target lives in.
TARGET = SRE2L.TARGETS[0]
UNRELATED = "README.md"
# --- the look-alike repository -------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A git repository with the sre2l and cda scripts and targets at their paths (one clone of
    VILA-Lab/SRe2L holds both), and a lock pinning it for both."""
    base = tmp_path_factory.mktemp("template")
    root = base / "SRe2L"
    head = build_checkout(root, [SRE2L, CDA], URL)
    (root / UNRELATED).write_text("look-alike\n")
    lock = write_lock(base / "lock.toml", root, [SRE2L, CDA], URL, head)
    # A method pinned in the lock without a patch yet (as CV-DD is planned).
    locks = parse_lock(lock.read_text())
    locks[LATER] = MethodLock(LATER, "https://github.com/example/CV-DD", "1" * 40)
    lock.write_text(format_lock(locks.values()))
    return root, lock, head


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """CIFAR-100-shaped real data (100 class folders, one tiny image each): the CIFAR recover
    script's teacher has 100 classes."""
    return write_image_folder(tmp_path_factory.mktemp("real") / "cifar100", 100, per_class=1, size=4)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Tiny-ImageNet-shaped real data (200 classes): what CDA's tiny script's teacher was trained on."""
    return write_image_folder(tmp_path_factory.mktemp("real") / "tiny", 200, per_class=1, size=4)


@pytest.fixture
def env(tmp_path, template, real_data, monkeypatch):
    """A fresh copy of the look-alike (``env.root``), a real-data folder and a private site dir."""
    src, lock, head = template
    root = tmp_path / "SRe2L"
    shutil.copytree(src, root, symlinks=True)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv(ENV_LOCK, str(lock))
    monkeypatch.setenv(activation.ENV_SITE_DIR, str(site))
    monkeypatch.delenv(ENV_CLONE_URL, raising=False)

    class Env:
        pass

    e = Env()
    e.base, e.root, e.data, e.site, e.lock, e.pinned = tmp_path, root, real_data, site, lock, head
    e.repo = git.Repo(root)
    yield e
    e.repo.close()


def _apply(e, *extra):
    return main(["sre2l", str(e.root), "--real-data", str(e.data), *extra])


def snapshot(base: Path):
    """Bytes of every file under ``base`` (git's index aside: ``git status`` refreshes it), and
    the ``git status`` of every repository in it."""
    files = {}
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if rel.name in ("index", "index.lock") and ".git" in rel.parts:
            continue
        files[str(rel)] = path.read_bytes() if path.is_file() else "dir"
    status = {}
    for dot_git in base.rglob(".git"):
        out = subprocess.run(["git", "-C", str(dot_git.parent), "status", "--porcelain", "--ignored"],
                             capture_output=True, text=True, check=True).stdout
        status[str(dot_git.parent)] = out
    return files, status


def assert_refused(capsys, rc, *fragments):
    """Exit 2, one line on stderr naming ``fragments``, no traceback, nothing on stdout."""
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.startswith("dire-apply: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def _change_target(e, target=TARGET):
    """Redefine ``target`` at the end of its file (the last definition is the one that runs)."""
    path = e.root / target.file
    name = target.symbol.split(".")[0]
    path.write_text(path.read_text() + f"\n\ndef {name}(*args):\n    return 'changed upstream'\n")


# --- apply and remove ----------------------------------------------------------------------------


def test_apply_then_remove_leaves_the_checkout_byte_identical(env, capsys):
    before = snapshot(env.base)
    exclude = env.root / ".git" / "info" / "exclude"
    exclude_before = exclude.read_bytes()

    assert _apply(env, "--r-c", "0.5", "--reduction", "sum") == 0
    out = capsys.readouterr().out
    config = activation.read_config(env.root, "sre2l")
    assert config["method"] == "sre2l" and config["commit"] == env.pinned and config["repository"] == URL
    assert (config["r_c"], config["r_e"], config["reduction"]) == (0.5, 0.001, "sum")
    assert config["real_data"] == str(env.data) and config["cache_dir"] == str(env.root / ".dire" / "cache")
    assert config["plugin_version"] and config["applied_at"]
    assert activation.applied_checkouts() == [str(env.root)]
    assert exclude.read_bytes() == exclude_before + b"/.dire/\n"
    assert env.repo.git.status("--porcelain") == ""  # .dire/ is hidden
    for script in SRE2L.SCRIPTS:
        assert script in out
    assert "DIRE_DISABLE=1" in out and f"dire-apply --remove sre2l {env.root}" in out

    assert main(["--remove", "sre2l", str(env.root)]) == 0
    assert "removed" in capsys.readouterr().out
    assert snapshot(env.base) == before
    assert exclude.read_bytes() == exclude_before
    assert activation.applied_checkouts() == [] and not (env.site / activation.PTH_NAME).exists()


def test_reapply_is_idempotent(env, capsys):
    before = snapshot(env.base)
    assert _apply(env) == 0
    assert _apply(env, "--r-e", "0.02", "--cache-dir", str(env.base / "cache")) == 0
    assert "re-applied" in capsys.readouterr().out
    assert (env.root / ".git/info/exclude").read_bytes().count(b"/.dire/") == 1
    assert activation.applied_checkouts() == [str(env.root)]
    assert activation.read_config(env.root, "sre2l")["r_e"] == 0.02
    # Someone drops our exclude line: .dire/ shows up untracked, which is not a dirty tree.
    exclude = env.root / ".git/info/exclude"
    exclude.write_bytes(exclude.read_bytes().replace(b"/.dire/\n", b""))
    assert _apply(env) == 0
    assert main(["--remove", "sre2l", str(env.root)]) == 0
    assert snapshot(env.base) == before


@pytest.mark.parametrize("original", [None, b"", b"*.log", b"# mine\n", b"/.dire/\n"],
                         ids=["missing", "empty", "no-newline", "plain", "already-there"])
def test_exclude_file_is_restored_exactly(env, original):
    exclude = env.root / ".git" / "info" / "exclude"
    if original is None:
        shutil.rmtree(exclude.parent)
    else:
        exclude.write_bytes(original)
    assert _apply(env) == 0
    assert exclude.read_bytes().splitlines().count(b"/.dire/") == 1
    assert main(["--remove", "sre2l", str(env.root)]) == 0
    if original is None:
        assert not exclude.parent.exists()
    else:
        assert exclude.read_bytes() == original


def test_ssh_remote_and_allow_drift_on_unrelatedcommit_all(env, capsys):
    env.repo.remotes.origin.set_url("git@github.com:vila-lab/SRe2L.git")
    (env.root / UNRELATED).write_text("a later upstream commit\n")
    # A comment in a target file is not a code change either.
    target = env.root / TARGET.file
    target.write_text("# reformatted upstream\n" + target.read_text())
    head = commit_all(env.repo, "unrelated")
    rc = _apply(env)
    assert_refused(capsys, rc, head, env.pinned, "none changed", "--allow-drift")
    assert _apply(env, "--allow-drift") == 0
    assert "accepted with --allow-drift" in capsys.readouterr().out
    assert activation.read_config(env.root, "sre2l")["commit"] == head


def test_remote_urls_normalise():
    same = [
        "https://github.com/VILA-Lab/SRe2L", "https://github.com/VILA-Lab/SRe2L.git",
        "https://github.com/VILA-Lab/SRe2L/", "git@github.com:VILA-Lab/SRe2L.git",
        "ssh://git@github.com/VILA-Lab/SRe2L.git", "ssh://git@GitHub.com:22/vila-lab/sre2l",
        "https://user:token@GITHUB.COM/VILA-Lab/SRe2L.git/", "git://github.com/VILA-Lab/SRe2L",
    ]
    assert {normalize_remote_url(u) for u in same} == {"github.com/vila-lab/sre2l"}
    assert normalize_remote_url("https://example.org/A/B.git") == "example.org/A/B"
    assert normalize_remote_url("https://github.com/VILA-Lab/DELT") != normalize_remote_url(URL)
    assert normalize_remote_url("/srv/mirror/SRe2L/") == "/srv/mirror/SRe2L"


# --- refusals ------------------------------------------------------------------------------------


def _wrong_remote(e):
    e.repo.remotes.origin.set_url("https://github.com/someone/else.git")


def _no_remote(e):
    e.repo.delete_remote(e.repo.remotes.origin)


def _dirty_tracked(e):
    (e.root / UNRELATED).write_text("edited\n")


def _dirty_untracked(e):
    (e.root / "notes.txt").write_text("new\n")


def _plain_dir(e):
    (e.base / "plain").mkdir()


def _empty_data(e):
    (e.base / "empty").mkdir()


def _ten_classes(e):
    write_image_folder(e.base / "ten", 10, per_class=1, size=4)


def _class_without_image(e):
    write_image_folder(e.base / "holes", 100, per_class=1, size=4)
    for image in (e.base / "holes" / "class_042").iterdir():
        image.unlink()


def _empty_files(e):
    write_image_folder(e.base / "blank", 7, per_class=1, size=4)  # a class count no teacher has, too
    for image in (e.base / "blank").rglob("*.png"):
        image.write_bytes(b"")


def _fifo_image(e):
    write_image_folder(e.base / "piped", 100, per_class=1, size=4)
    os.mkfifo(e.base / "piped" / "class_003" / "zz.png")  # not a first image: never decoded by the check


REFUSALS = {
    # name: (setup, argv with {root}/{data}/{base}, fragments of the message)
    "missing-path": (None, ["sre2l", "{base}/absent", "--real-data", "{data}"], ["absent does not exist"]),
    "file-as-path": (None, ["sre2l", "{root}/README.md", "--real-data", "{data}"], ["is not a directory"]),
    "not-a-repo": (_plain_dir, ["sre2l", "{base}/plain", "--real-data", "{data}"], ["not inside a git repository"]),
    "subfolder": (None, ["sre2l", "{root}/SRe2L/recover", "--real-data", "{data}"], ["subfolder", "repository root {root}"]),
    "wrong-remote": (_wrong_remote, ["sre2l", "{root}", "--real-data", "{data}"], ["not a clone of " + URL, "someone/else"]),
    "no-remote": (_no_remote, ["sre2l", "{root}", "--real-data", "{data}"], ["has no remote"]),
    "unknown-method": (None, ["nope", "{root}", "--real-data", "{data}"], ["unknown method 'nope'", "sre2l"]),
    "unsupported-method": (None, [LATER, "{root}", "--real-data", "{data}"], [f"{LATER} is not supported yet"]),
    "dirty-tracked": (_dirty_tracked, ["sre2l", "{root}", "--real-data", "{data}"], ["uncommitted", UNRELATED]),
    "dirty-untracked": (_dirty_untracked, ["sre2l", "{root}", "--real-data", "{data}"], ["untracked", "notes.txt"]),
    "missing-real-data": (None, ["sre2l", "{root}", "--real-data", "{base}/nodata"], ["--real-data", "nodata does not exist"]),
    "no-real-data": (None, ["sre2l", "{root}"], ["--real-data DIR is required"]),
    "negative-weight": (None, ["sre2l", "{root}", "--real-data", "{data}", "--r-c", "-1"], ["--r-c"]),
    "nan-weight": (None, ["sre2l", "{root}", "--real-data", "{data}", "--r-e", "nan"], ["--r-e"]),
    "bad-reduction": (None, ["sre2l", "{root}", "--real-data", "{data}", "--reduction", "max"], ["--reduction"]),
    "no-arguments": (None, [], ["METHOD and PATH are required"]),
    "unknown-option": (None, ["sre2l", "{root}", "--frobnicate"], ["--frobnicate"]),
    "list-with-path": (None, ["--list", "sre2l"], ["--list takes no"]),
    "remove-with-options": (None, ["--remove", "sre2l", "{root}", "--r-c", "1"], ["--remove takes no --r-c"]),
    "smoke-without-verify": (None, ["sre2l", "{root}", "--smoke"], ["--smoke goes with --verify"]),
    "cache-dir-is-a-file": (None, ["sre2l", "{root}", "--real-data", "{data}", "--cache-dir", "{root}/README.md"], ["--cache-dir"]),
    "cache-dir-under-a-file": (None, ["sre2l", "{root}", "--real-data", "{data}", "--cache-dir", "{root}/README.md/c"],
                               ["--cache-dir", "README.md"]),
    "empty-real-data": (_empty_data, ["sre2l", "{root}", "--real-data", "{base}/empty"], ["{base}/empty"]),
    "real-data-of-another-class-count": (_ten_classes, ["sre2l", "{root}", "--real-data", "{base}/ten"], ["10"]),
    "real-data-class-without-image": (_class_without_image, ["sre2l", "{root}", "--real-data", "{base}/holes"],
                                      ["class_042"]),
    "real-data-of-empty-files": (_empty_files, ["sre2l", "{root}", "--real-data", "{base}/blank"],
                                 ["real image {base}/blank/class_000/img_0.png is an empty file"]),
    "real-data-with-a-fifo": (_fifo_image, ["sre2l", "{root}", "--real-data", "{base}/piped"],
                              ["real image {base}/piped/class_003/zz.png is a FIFO"]),
    "weight-inf": (None, ["sre2l", "{root}", "--real-data", "{data}", "--r-c", "inf"], ["--r-c"]),
    "zero-weights": (None, ["sre2l", "{root}", "--real-data", "{data}", "--r-c", "0", "--r-e", "0"],
                     ["are all 0, so DiRe would add nothing"]),
    "weight-beyond-float32": (None, ["sre2l", "{root}", "--real-data", "{data}", "--r-c", "1e39"], ["--r-c", "'1e39'"]),
    "share-zero": (None, ["sre2l", "{root}", "--real-data", "{data}", "--share", "0"], ["--share", "'0'"]),
    "share-negative": (None, ["sre2l", "{root}", "--real-data", "{data}", "--share=-0.1"], ["--share", "'-0.1'"]),
    "share-nan": (None, ["sre2l", "{root}", "--real-data", "{data}", "--share", "nan"], ["--share", "'nan'"]),
    "share-inf": (None, ["sre2l", "{root}", "--real-data", "{data}", "--share", "inf"], ["--share", "'inf'"]),
    "share-and-weights": (None, ["sre2l", "{root}", "--real-data", "{data}", "--share", "0.1", "--r-e", "0.01"],
                          ["--share calibrates the weights itself"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_without_changing_anything(env, capsys, case):
    setup, argv, fragments = REFUSALS[case]
    if setup:
        setup(env)
    before = snapshot(env.base)
    fill = dict(root=env.root, data=env.data, base=env.base)
    rc = main([a.format(**fill) for a in argv])
    assert_refused(capsys, rc, *[f.format(**fill) for f in fragments])
    assert snapshot(env.base) == before


def test_weights_default_to_the_methods_own_and_share_is_written(env, capsys):
    assert _apply(env) == 0
    config = activation.read_config(env.root, "sre2l")
    assert (config["r_c"], config["r_e"], config["share"]) == (0.1, 0.001, None)  # sre2l: the released weights
    assert _apply(env, "--share", "0.2") == 0
    config = activation.read_config(env.root, "sre2l")
    assert (config["r_c"], config["r_e"], config["share"]) == (0.1, 0.001, 0.2)  # the calibration's start
    assert "share      0.2" in capsys.readouterr().out
    assert _apply(env, "--r-e", "0.01") == 0
    assert activation.read_config(env.root, "sre2l")["share"] is None  # explicit weights: no calibration


def test_list_names_each_methods_default_weight(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "default weight: r_c 0.1, r_e 0.001" in out
    for method in ("dm", "mtt"):
        block = out[out.index(f"\n{method} "):]
        share = load_method(method).DEFAULT_WEIGHTS.share
        assert f"default weight: share {share:g}" in block.split("\n\n")[0]


def test_commit_drift_names_both_commits_and_the_changed_target(env, capsys):
    _change_target(env)
    head = commit_all(env.repo, "upstream changes get_images")
    before = snapshot(env.base)
    for extra in ([], ["--allow-drift"]):
        err = assert_refused(capsys, _apply(env, *extra), head, env.pinned, f"{TARGET.file}::{TARGET.symbol}")
        assert "git -C" in err and "checkout" in err
        assert snapshot(env.base) == before


def test_method_without_scripts_in_a_supported_patch_is_a_packaging_error(env, tmp_path, monkeypatch, capsys):
    locks = load_lock()
    broken = dict(locks, sre2l=MethodLock("sre2l", URL, env.pinned))
    path = tmp_path / "broken.toml"
    path.write_text(format_lock(broken.values()))
    monkeypatch.setenv(ENV_LOCK, str(path))
    assert_refused(capsys, _apply(env), "packaging bug")


# --- remove --------------------------------------------------------------------------------------


def test_remove_refuses_what_is_not_applied(env, capsys):
    before = snapshot(env.base)
    assert_refused(capsys, main(["--remove", "sre2l", str(env.root)]), "not applied", str(env.root))
    assert_refused(capsys, main(["--remove", "nope", str(env.root)]), "unknown method")
    assert _apply(env) == 0
    capsys.readouterr()
    assert_refused(capsys, main(["--remove", "cda", str(env.root)]), "applied for sre2l, not cda")
    assert main(["--remove", "sre2l", str(env.root)]) == 0
    assert snapshot(env.base) == before


def test_remove_forgets_a_deleted_checkout(env, capsys):
    assert _apply(env) == 0
    env.repo.close()
    shutil.rmtree(env.root)
    assert main(["--remove", "sre2l", str(env.root)]) == 0
    assert activation.applied_checkouts() == []


def test_remove_keeps_an_outside_cache(env, capsys):
    cache = env.base / "cache"
    assert _apply(env, "--cache-dir", str(cache)) == 0
    cache.mkdir()
    assert main(["--remove", "sre2l", str(env.root)]) == 0
    assert cache.is_dir() and str(cache) in capsys.readouterr().out


def test_two_methods_on_one_checkout_each_keep_their_settings(env, capsys, tiny_data):
    before = snapshot(env.base)
    assert _apply(env, "--r-c", "0.3") == 0
    assert main(["cda", str(env.root), "--real-data", str(tiny_data), "--r-c", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "also       sre2l" in out
    assert activation.applied_methods(env.root) == ["cda", "sre2l"]
    assert activation.read_config(env.root, "sre2l")["r_c"] == 0.3  # the second apply kept the first
    assert activation.read_config(env.root, "cda")["r_c"] == 0.7
    assert main(["--status"]) == 0
    status = capsys.readouterr().out
    assert f"{env.root}: sre2l @" in status and f"{env.root}: cda @" in status
    assert main(["--remove", "cda", str(env.root)]) == 0
    assert "still applied for sre2l" in capsys.readouterr().out
    assert activation.applied_methods(env.root) == ["sre2l"] and activation.applied_checkouts() == [str(env.root)]
    assert env.repo.git.status("--porcelain") == ""
    assert main(["--remove", "sre2l", str(env.root)]) == 0
    assert snapshot(env.base) == before


def test_a_config_of_dire_plugin_0_1_is_converted(env, capsys, tiny_data):
    # dire-apply 0.1 wrote one .dire/config.json (the second method replaced the first).
    assert _apply(env, "--r-c", "0.3") == 0
    folder = env.root / ".dire"
    config = activation.read_config(env.root, "sre2l")
    config["git_exclude"] = activation.read_exclude_record(env.root)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "sre2l.json").unlink()
    (folder / "exclude.json").unlink()
    assert main(["cda", str(env.root), "--real-data", str(tiny_data)]) == 0
    assert activation.applied_methods(env.root) == ["cda", "sre2l"] and not (folder / "config.json").exists()
    assert activation.read_config(env.root, "sre2l")["r_c"] == 0.3


def test_an_unreadable_config_of_dire_plugin_0_1_blocks_nothing(env, capsys):
    assert _apply(env) == 0
    legacy = env.root / ".dire" / "config.json"
    legacy.write_text("{not json")
    capsys.readouterr()
    assert _apply(env) == 0  # re-applying is a way out
    out = capsys.readouterr().out
    assert str(legacy) in out and "dropped" in out and not legacy.exists()
    legacy.write_text("{not json")
    assert main(["--remove", "sre2l", str(env.root)]) == 0  # and so is removing
    assert not (env.root / ".dire").exists()


def test_a_damaged_exclude_record_blocks_neither_apply_nor_remove(env, capsys):
    assert _apply(env) == 0
    (env.root / ".dire" / "exclude.json").write_text("[not json")
    assert _apply(env) == 0
    assert main(["--remove", "sre2l", str(env.root)]) == 0
    assert not (env.root / ".dire").exists() and activation.applied_checkouts() == []


def test_written_files_are_readable_by_everyone_the_umask_allows(env):
    # Python's site skips a .pth it cannot read: an owner-only file would run other users vanilla.
    import os

    assert _apply(env) == 0
    umask = os.umask(0)
    os.umask(umask)
    for path in (env.site / activation.PTH_NAME, env.root / ".dire" / "sre2l.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_a_damaged_startup_file_is_named(env, capsys):
    assert _apply(env) == 0
    pth = env.site / activation.PTH_NAME
    pth.write_text(pth.read_text().replace("[", "[[", 1))
    capsys.readouterr()
    assert_refused(capsys, main(["--status"]), str(pth), "damaged")


CONCURRENT_REGISTRATION = """
import sys, time
from dire_plugin.activation import applied as activation
start, base, n = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
for i in range(n):
    activation.register_checkout(f"{base}/checkout-{i}")
"""


def test_concurrent_registrations_are_never_lost(env):
    # Each registration reads, edits and rewrites the .pth: eight processes at once must all land.
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_REGISTRATION, str(start), f"{env.base}/p{k}", "10"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(8)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [err for _, err, rc in results if rc]
    roots = activation.applied_checkouts()
    assert len(roots) == 80 and len(set(roots)) == 80
    assert sorted(p.name for p in env.site.iterdir()) == [activation.PTH_NAME]  # no temporaries, no lock file


def test_invalid_config_is_named_and_can_still_be_removed(env, capsys):
    assert _apply(env) == 0
    capsys.readouterr()
    path = env.root / ".dire" / "sre2l.json"
    path.write_text("{not json")
    assert main(["--status"]) == 0
    assert str(path) in capsys.readouterr().out
    assert main(["--remove", "sre2l", str(env.root)]) == 0  # the way out of a broken config
    assert not (env.root / ".dire").exists()


# --- clone ---------------------------------------------------------------------------------------


def test_clone_checks_out_the_pin_then_applies(env, capsys, monkeypatch, template):
    monkeypatch.setenv(ENV_CLONE_URL, str(template[0]))
    dest = env.base / "fresh" / "SRe2L"
    assert main(["sre2l", str(dest), "--real-data", str(env.data), "--clone"]) == 0
    with git.Repo(dest) as repo:
        assert repo.head.commit.hexsha == env.pinned and repo.head.is_detached
        assert URL in [u for r in repo.remotes for u in r.urls]
        assert repo.git.status("--porcelain") == ""
    assert activation.read_config(dest, "sre2l")["method"] == "sre2l"
    # An existing checkout is applied to, not cloned over.
    assert main(["sre2l", str(dest), "--real-data", str(env.data), "--clone"]) == 0
    assert "instead of cloning" in capsys.readouterr().out


def test_failed_clone_leaves_nothing(env, capsys, monkeypatch):
    monkeypatch.setenv(ENV_CLONE_URL, str(env.base / "no-such-repo"))
    before = snapshot(env.base)
    dest = env.base / "fresh"
    rc = main(["sre2l", str(dest), "--real-data", str(env.data), "--clone"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dire-apply: error: cannot clone") and err.count("\n") == 1
    assert "does not exist" in err and not err.rstrip().endswith("'"), err  # git's reason, not a stray quote
    assert not dest.exists() and snapshot(env.base) == before


def test_clone_of_a_drifted_repository_is_removed_again(env, capsys, monkeypatch):
    _change_target(env)
    commit_all(env.repo, "drift")
    # The pinned commit is there, but the lock says something else about it.
    lock = load_lock()["sre2l"]
    bad = MethodLock("sre2l", URL, env.pinned, lock.scripts, {k: "0" * 16 for k in lock.fingerprints})
    path = env.base / "bad.toml"
    path.write_text(format_lock(dict(load_lock(), sre2l=bad).values()))
    monkeypatch.setenv(ENV_LOCK, str(path))
    monkeypatch.setenv(ENV_CLONE_URL, str(env.root))
    dest = env.base / "fresh"
    rc = main(["sre2l", str(dest), "--real-data", str(env.data), "--clone"])
    capsys.readouterr()
    assert rc == 2 and not dest.exists()


# --- reports -------------------------------------------------------------------------------------


def test_list(env, capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    sre2l = next(line for line in lines if line.startswith("sre2l"))
    assert "supported" in sre2l and URL in sre2l and env.pinned in sre2l
    for script in SRE2L.SCRIPTS:
        assert script in out
    assert "supported" in next(line for line in lines if line.startswith("dwa"))
    assert "not yet" in next(line for line in lines if line.startswith(LATER))


def test_status(env, capsys):
    assert main(["--status"]) == 0
    assert "not applied to any checkout" in capsys.readouterr().out
    assert _apply(env) == 0
    capsys.readouterr()
    assert main(["--status"]) == 0
    out = capsys.readouterr().out
    assert f"{env.root}: sre2l @ {env.pinned}, config present" in out
    # A .pth of an older dire-plugin (its line imported a module that has moved): --status rewrites it.
    pth = env.site / activation.PTH_NAME
    current = pth.read_text()
    pth.write_text(current.replace("dire_plugin.", "dire_plugin_old."))
    assert main(["--status"]) == 0
    assert "rewritten" in capsys.readouterr().out and pth.read_text() == current
    shutil.rmtree(env.root / ".dire")
    assert main(["--status"]) == 0
    assert f"{env.root}: config missing" in capsys.readouterr().out


def test_verify(env, capsys):
    assert main(["--verify", "sre2l", str(env.root)]) == 0
    out = capsys.readouterr().out
    n = len(SRE2L.TARGETS)
    assert f"{n} of {n} match" in out and "result: OK" in out and env.pinned in out

    (env.root / UNRELATED).write_text("moved on\n")
    head = commit_all(env.repo, "unrelated")
    assert main(["--verify", "sre2l", str(env.root)]) == 1
    assert "apply with --allow-drift" in capsys.readouterr().out
    assert main(["--verify", "sre2l", str(env.root), "--allow-drift"]) == 0
    capsys.readouterr()

    # An uncommitted change that touches no target: dire-apply would refuse the tree, so does --verify.
    (env.root / UNRELATED).write_text("edited, not committed\n")
    assert main(["--verify", "sre2l", str(env.root), "--allow-drift"]) == 1
    out = capsys.readouterr().out
    assert "result: DIRTY" in out and "result: OK" not in out
    (env.root / UNRELATED).write_text("moved on\n")

    _change_target(env)
    assert main(["--verify", "sre2l", str(env.root), "--allow-drift"]) == 1
    out = capsys.readouterr().out
    assert f"CHANGED  {TARGET.file}::{TARGET.symbol}" in out and "uncommitted" in out and head in out
    (env.root / TARGET.file).unlink()
    assert main(["--verify", "sre2l", str(env.root)]) == 1
    assert f"MISSING  {TARGET.file}::{TARGET.symbol} (file missing)" in capsys.readouterr().out

    assert_refused(capsys, main(["--verify", "sre2l", str(env.base / "absent")]), "does not exist")


def test_verify_smoke_calls_run_smoke(env, capsys, monkeypatch):
    calls = []
    fake = types.ModuleType("dire_plugin.upstream.smoke")
    fake.__spec__ = importlib.machinery.ModuleSpec("dire_plugin.upstream.smoke", None)
    fake.run_smoke = lambda method, root, config: calls.append((method, root, config)) or 1
    monkeypatch.setitem(sys.modules, "dire_plugin.upstream.smoke", fake)
    assert main(["--verify", "--smoke", "sre2l", str(env.root), "--r-c", "0.3"]) == 1  # the smoke's code
    ((method, root, config),) = calls
    assert (method, root, config["r_c"], config["method"]) == ("sre2l", env.root, 0.3, "sre2l")
    assert _apply(env) == 0
    assert main(["--verify", "--smoke", "sre2l", str(env.root)]) == 1
    assert calls[-1][2] == activation.read_config(env.root, "sre2l")  # an applied checkout's own config
    capsys.readouterr()


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--allow-drift" in capsys.readouterr().out


# --- the maintainer tool ------------------------------------------------------------------------


def test_pin_tool_rewrites_one_method(template, tmp_path):
    src, lock, head = template
    root = tmp_path / "SRe2L"
    shutil.copytree(src, root, symlinks=True)
    spec = importlib.util.spec_from_file_location("pin_upstream", Path(__file__).parents[2] / "tools" / "pin_upstream.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    pinned = lock.read_text()
    stale = tmp_path / "lock.toml"
    locks = parse_lock(pinned)
    locks["sre2l"] = MethodLock("sre2l", URL, head)  # no scripts, no fingerprints yet
    stale.write_text(format_lock(locks.values()))
    assert tool.main(["sre2l", str(root), "--lock", str(stale)]) == 0
    assert stale.read_text() == pinned
    (root / UNRELATED).write_text("local edit\n")
    with pytest.raises(SystemExit, match="uncommitted"):
        tool.main(["sre2l", str(root), "--lock", str(stale)])


# --- the installed console script ----------------------------------------------------------------


def test_console_script(env, capsys):
    # --status: the one mode that loads no patch module, so no torch import (seconds) in the child.
    exe = shutil.which("dire-apply") or str(Path(sys.executable).with_name("dire-apply"))
    assert Path(exe).exists(), "pip install -e . provides the dire-apply console script"
    assert _apply(env) == 0
    run = subprocess.run([exe, "--status"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert f"{env.root}: sre2l @ {env.pinned}, config present" in run.stdout
