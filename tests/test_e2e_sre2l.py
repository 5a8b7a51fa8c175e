"""End to end through the product's own path: ``dire-apply`` on a look-alike SRe²L checkout, then
the unchanged script run by a plain ``python`` whose start-up finds the ``.pth`` line.

The script is the demo's SRe²L-shaped recover script (ours, dire_plugin/demo/recover) placed at the
path of the CIFAR recover script; with ``--device cuda`` it calls CUDA as the real one does, and
runs on CPU through the shim, as the real one does in smoke runs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dire_plugin.activation import applied as activation
from dire_plugin.cli.apply import main as dire_apply
from dire_plugin.upstream.lockfile import ENV_LOCK
from dire_plugin.hooks.registry import load_method
from dire_plugin.demo.synth import RECOVER
from envs import build_wheel, child_venv, site_packages
from lookalike import build_checkout, write_demo_teacher, write_image_folder, write_lock

HERE = Path(__file__).resolve().parent
URL = "https://github.com/VILA-Lab/SRe2L"
SRE2L = load_method("sre2l")
CDA = load_method("cda")  # one clone of VILA-Lab/SRe2L holds both
SCRIPT = "SRe2L/*small_dataset/recover_cifar.py"
UTILS = "SRe2L/*small_dataset/utils.py"
CLASSES = 100  # the CIFAR-100 script's teacher
ARGS = ["--num-classes", str(CLASSES), "--batch-size", "100", "--iteration", "3", "--ipc-start", "0",
        "--ipc-end", "2", "--store-best-images", "--seed", "1", "--exp-name", "test", "--device", "cuda"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A venv (the test interpreter's packages visible) whose site-packages receives the .pth, a look-alike
    checkout with the fixture at the CIFAR script's path, a lock pinning it, real data, a teacher."""
    base = tmp_path_factory.mktemp("e2e")
    # The product as users get it: a wheel installed into the environment that runs the script.
    py = child_venv(base / "venv", build_wheel(base))
    site = site_packages(py)
    root = base / "SRe2L"
    files = {SCRIPT: RECOVER.read_text(), UTILS: (RECOVER.parent / "utils.py").read_text()}
    head = build_checkout(root, [SRE2L, CDA], URL, files)
    lock = write_lock(base / "lock.toml", root, [SRE2L, CDA], URL, head)
    data = write_image_folder(base / "real", CLASSES, per_class=2, size=16)
    ckpt = write_demo_teacher(base / "teacher.pth", num_classes=CLASSES)
    return {"base": base, "py": py, "site": Path(site), "root": root, "lock": lock, "head": head,
            "data": data, "ckpt": ckpt}


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv(ENV_LOCK, str(world["lock"]))
    monkeypatch.setenv(activation.ENV_SITE_DIR, str(world["site"]))
    yield world
    for method in activation.applied_methods(world["root"]):
        dire_apply(["--remove", method, str(world["root"])])


def _run(world, out, extra_env=None, script=SCRIPT, args=ARGS, shim_only=False, popen=False):
    """``python SCRIPT ARGS`` from the script's folder, CUDA shimmed onto the CPU (by the
    activation, or, for a checkout with nothing applied, by a wrapper that installs the shim only);
    with ``popen``, the running process (stderr piped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_") or k == ENV_LOCK}
    env.update({"DIRE_CPU_SHIM": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})})
    path = world["root"] / script
    argv = [path.name, "--arch-path", str(world["ckpt"]), "--syn-data-path", str(out), *args]
    if shim_only:
        code = ("import sys, runpy, dire_plugin.upstream.shim as s; s.install(); sys.path.insert(0, '.'); "
                f"sys.argv = {argv!r}; runpy.run_path({path.name!r}, run_name='__main__')")
        cmd = [str(world["py"]), "-c", code]
    else:
        cmd = [str(world["py"]), *argv]
    if popen:
        return subprocess.Popen(cmd, cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, cwd=path.parent, env=env, capture_output=True, text=True, timeout=300)


def _images(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_applied_checkout_runs_with_dire_and_disable_gives_vanilla(env, tmp_path):
    root = env["root"]
    assert dire_apply(["sre2l", str(root), "--real-data", str(env["data"]), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (env["site"] / activation.PTH_NAME).is_file()

    run = _run(env, tmp_path / "dire")
    assert run.returncode == 0, run.stderr
    assert "[dire] sre2l patch active: r_c=0.1, r_e=0.001" in run.stderr and env["head"] in run.stderr
    manifest = json.loads((tmp_path / "dire" / "test" / "dire_manifest.json").read_text())
    assert manifest["method"] == "sre2l" and manifest["upstream_commit"] == env["head"]
    assert manifest["synthesis_steps"] == 6 and manifest["terms_added"] == 6  # 3 iterations x 2 ipc
    assert manifest["batches_in_memory"] == 1 and manifest["memory_embeddings"] == CLASSES
    assert manifest["bank"]["classes"] == CLASSES and manifest["bank"]["fingerprint"]
    assert manifest["mean_values"]["cd"] is not None
    dire_images = _images(tmp_path / "dire")
    assert len(dire_images) == 2 * CLASSES

    disabled = _run(env, tmp_path / "disabled", {"DIRE_DISABLE": "1"})
    assert disabled.returncode == 0, disabled.stderr
    assert "runs vanilla" in disabled.stderr
    assert not (tmp_path / "disabled" / "test" / "dire_manifest.json").exists()

    assert dire_apply(["--remove", "sre2l", str(root)]) == 0
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout == ""
    assert not (env["site"] / activation.PTH_NAME).exists()
    vanilla = _run(env, tmp_path / "vanilla", shim_only=True)
    assert vanilla.returncode == 0 and "[dire]" not in vanilla.stderr, vanilla.stderr
    assert _images(tmp_path / "disabled") == _images(tmp_path / "vanilla")  # DIRE_DISABLE is exactly vanilla
    assert dire_images != _images(tmp_path / "vanilla")  # and DiRe changed the images


def test_moved_hook_target_stops_the_run(env, tmp_path):
    root = env["root"]
    assert dire_apply(["sre2l", str(root), "--real-data", str(env["data"])]) == 0
    utils = root / UTILS
    original = utils.read_text()
    try:
        utils.write_text(original.replace("class BNFeatureHook", "class BNStatisticsHook"))
        run = _run(env, tmp_path / "moved")
        assert run.returncode == 2
        assert f"{UTILS}: BNFeatureHook" in run.stderr and env["head"] in run.stderr
        assert "Traceback" not in run.stderr
        assert not (tmp_path / "moved").exists()
    finally:
        utils.write_text(original)


def test_pth_is_inert_for_other_processes(env, tmp_path):
    assert dire_apply(["sre2l", str(env["root"]), "--real-data", str(env["data"])]) == 0
    probe = "import sys; print('dire_plugin.activation.startup' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([str(env["py"]), "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    # A script inside the checkout that no patch covers (a squeeze/relabel script) stays vanilla.
    other = env["root"] / "SRe2L" / "probe_uncovered.py"
    other.write_text(probe + "\n")
    try:
        out = subprocess.run([str(env["py"]), str(other)], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["True", "False"] and "[dire]" not in out.stderr
    finally:
        other.unlink()


def test_dire_variables_read_yes_and_no_and_refuse_the_rest(env, tmp_path):
    assert dire_apply(["sre2l", str(env["root"]), "--real-data", str(env["data"]),
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    on = _run(env, tmp_path / "false", {"DIRE_DISABLE": "false"})  # once read as "set": DiRe off
    assert on.returncode == 0 and "[dire] sre2l patch active" in on.stderr, on.stderr
    off = _run(env, tmp_path / "yes", {"DIRE_DISABLE": "yes"})
    assert off.returncode == 0 and "[dire] DIRE_DISABLE=yes: sre2l runs vanilla" in off.stderr, off.stderr
    for name, value in (("DIRE_DISABLE", "maybe"), ("DIRE_DISABLE", "2"), ("DIRE_CPU_SHIM", "maybe"),
                        ("DIRE_DIST_TIMEOUT", "soon")):
        run = _run(env, tmp_path / "bad", {name: value})
        line = _one_line_error(run)
        assert line.startswith(f"dire: error: {name}={value!r} is not "), (name, run.stderr)
        assert not (tmp_path / "bad").exists(), name


def test_dire_run_launcher_without_apply(env, tmp_path):
    script = env["root"] / SCRIPT
    cmd = [str(env["py"]), "-m", "dire_plugin.cli.run", "sre2l", str(script), "--real-data", str(env["data"]),
           "--r-c", "0.5", "--cache-dir", str(tmp_path / "cache"), "--",
           "--arch-path", str(env["ckpt"]), "--syn-data-path", str(tmp_path / "out"), *ARGS]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_") or k == ENV_LOCK}
    run = subprocess.run(cmd, cwd=script.parent, env={**environ, "DIRE_CPU_SHIM": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "out" / "test" / "dire_manifest.json").read_text())
    assert manifest["terms_added"] == 6 and manifest["config"]["r_c"] == 0.5


def test_auto_import_without_settings_is_an_error(tmp_path):
    script = tmp_path / "lonely.py"
    script.write_text("import dire_plugin.auto\nprint('ran')\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_")}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environ)
    assert run.returncode != 0 and "ran" not in run.stdout
    assert "no DiRe settings" in run.stderr


def test_child_processes_inherit_the_activation(env, tmp_path):
    # mp.spawn / torchrun workers start with argv ['-c', ...]: they activate through DIRE_ACTIVATE,
    # which the parent exported, and the same .pth line.
    assert dire_apply(["sre2l", str(env["root"]), "--real-data", str(env["data"])]) == 0
    parent = env["root"] / SCRIPT
    code = (
        "import json, os, subprocess, sys\n"
        "import torch  # activation happens at the script's first torch import\n"
        "child = 'import torch, dire_plugin.activation.startup as s; print(s.active_method())'\n"
        "out = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True)\n"
        "print('parent', json.loads(os.environ['DIRE_ACTIVATE'])['method'])\n"
        "print('child', out.stdout.strip(), out.returncode)\n"
    )
    original = parent.read_text()
    try:
        # A covered path, so the parent activates; the hooked symbols are left as they are (the
        # start-up check would stop anything else), and the file is restored before the test ends.
        parent.write_text(code + "raise SystemExit(0)\n" + original)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_") or k == ENV_LOCK}
        environ["DIRE_ACTIVATE"] = ""
        run = subprocess.run([str(env["py"]), parent.name], cwd=parent.parent, env=environ, capture_output=True,
                             text=True, timeout=120)
    finally:
        parent.write_text(original)
    assert "parent sre2l" in run.stdout, run.stderr
    assert "child sre2l 0" in run.stdout, run.stderr


# --- faults: a second method, failed runs, bad settings, Ctrl-C ------------------------------------


def _checkout_files(root):
    """Every file of the checkout outside .git/ and our hidden .dire/, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {".git", ".dire", "__pycache__"} & set(p.relative_to(root).parts)}


def _one_line_error(run, code=2):
    lines = run.stderr.strip().splitlines()
    assert run.returncode == code, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    return lines[-1]


def test_a_second_method_keeps_the_first_working(env, tmp_path):
    from lookalike import write_image_folder

    root = env["root"]
    tiny = write_image_folder(tmp_path / "tiny", 200, per_class=1, size=8)  # CDA's tiny teacher: 200 classes
    assert dire_apply(["sre2l", str(root), "--real-data", str(env["data"])]) == 0
    assert dire_apply(["cda", str(root), "--real-data", str(tiny)]) == 0
    run = _run(env, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert "[dire] sre2l patch active" in run.stderr
    assert json.loads((tmp_path / "out" / "test" / "dire_manifest.json").read_text())["terms_added"] == 6


def test_a_failed_run_writes_nothing_into_the_checkout(env, tmp_path):
    import torch

    root = env["root"]
    cache = tmp_path / "cache"
    assert dire_apply(["sre2l", str(root), "--real-data", str(env["data"]), "--cache-dir", str(cache)]) == 0
    state = torch.load(env["ckpt"], weights_only=True)
    first = next(k for k, v in state["state_dict"].items() if v.dim() == 4)
    state["state_dict"][first].view(-1)[0] = float("nan")  # one NaN weight: every embedding is NaN
    bad = tmp_path / "nan-teacher.pth"
    torch.save(state, bad)
    before = _checkout_files(root)
    run = _run(env, tmp_path / "out", args=[*ARGS, "--arch-path", str(bad)])
    line = _one_line_error(run)
    assert line.startswith("dire: error: ") and "NaN" in line, run.stderr
    assert f"manifest of this run: {cache / 'runs'}" in line
    manifest = Path(line.rsplit("manifest of this run: ", 1)[1].rstrip(")"))
    assert manifest.is_file() and json.loads(manifest.read_text())["status"] == "failed"
    assert _checkout_files(root) == before
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout == ""
    assert dire_apply(["--remove", "sre2l", str(root)]) == 0
    assert dire_apply(["sre2l", str(root), "--real-data", str(env["data"])]) == 0  # not refused as dirty


def _default_sigint():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _dire_run(env, tmp_path, *options, args=ARGS, timeout=300, popen=False):
    script = env["root"] / SCRIPT
    cmd = [str(env["py"]), "-m", "dire_plugin.cli.run", "sre2l", str(script), *options, "--",
           "--arch-path", str(env["ckpt"]), "--syn-data-path", str(tmp_path / "out"), *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_") or k == ENV_LOCK}
    environ.update(DIRE_CPU_SHIM="1", PYTHONUNBUFFERED="1")
    if popen:
        # Ctrl-C as a terminal delivers it: a shell that started this suite in the background (`cmd &`)
        # leaves SIGINT ignored, and an ignored signal stays ignored across exec.
        return subprocess.Popen(cmd, cwd=script.parent, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_default_sigint)
    return subprocess.run(cmd, cwd=script.parent, env=environ, capture_output=True, text=True, timeout=timeout)


def test_dire_run_refuses_bad_settings_before_any_work(env, tmp_path):
    from lookalike import write_image_folder

    data = str(env["data"])
    (tmp_path / "a-file").write_text("x")
    ten = write_image_folder(tmp_path / "ten", 10, per_class=1, size=8)
    cases = {
        "negative r_c": (["--real-data", data, "--r-c", "-5"], "--r-c"),
        "nan r_c": (["--real-data", data, "--r-c", "nan"], "--r-c"),
        "zero share": (["--real-data", data, "--share", "0"], "--share"),
        "r_c beyond float32": (["--real-data", data, "--r-c", "1e39"], "at most 3.4e+38"),
        "both weights 0": (["--real-data", data, "--r-c", "0", "--r-e", "0"], "are all 0, so DiRe would add nothing"),
        "share with weights": (["--real-data", data, "--share", "0.1", "--r-c", "0.5"], "--share calibrates the weights"),
        "no real data": ([], "no real data"),
        "cache under a file": (["--real-data", data, "--cache-dir", str(tmp_path / "a-file" / "cache")], "a-file"),
        "another class count": (["--real-data", str(ten)], "10"),
    }
    for name, (options, fragment) in cases.items():
        run = _dire_run(env, tmp_path, *options)
        line = _one_line_error(run)
        assert line.startswith("dire-run: error: ") and fragment in line, (name, run.stderr)
        assert not (tmp_path / "out").exists(), name


def test_settings_edited_by_hand_are_checked(env, tmp_path):
    root = env["root"]
    assert dire_apply(["sre2l", str(root), "--real-data", str(env["data"])]) == 0
    path = root / ".dire" / "sre2l.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "r_c": -5}))
    line = _one_line_error(_run(env, tmp_path / "neg"))
    assert str(path) in line and "r_c must be a finite number >= 0" in line
    path.write_text(json.dumps({**config, "share": -0.5}))
    line = _one_line_error(_run(env, tmp_path / "share"))
    assert str(path) in line and "share must be a finite number > 0" in line
    path.write_text(json.dumps({**config, "memory": "false"}))  # a string: truthy, it would keep the memory on
    line = _one_line_error(_run(env, tmp_path / "string"))
    assert str(path) in line and "memory must be true or false" in line
    path.write_text("{ not json")
    line = _one_line_error(_run(env, tmp_path / "broken"))
    assert str(path) in line and "not valid JSON" in line
    assert not any((tmp_path / d).exists() for d in ("neg", "share", "string", "broken"))


LONG_ARGS = [a if a != "3" else "100000" for a in ARGS]  # --iteration: long enough to interrupt


def _signal_at_the_first_step(proc, signum):
    """Send ``signum`` once the run has logged its first DiRe term; its whole stderr."""
    import time

    seen = []
    deadline = time.time() + 240
    for line in proc.stderr:
        seen.append(line)
        if "[dire] step 1:" in line or time.time() > deadline:
            break
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=120)
    return "".join(seen) + rest


def test_ctrl_c_under_dire_run_is_one_line_and_130(env, tmp_path):
    import signal

    proc = _dire_run(env, tmp_path, "--real-data", str(env["data"]), "--cache-dir", str(tmp_path / "cache"),
                     args=LONG_ARGS, popen=True)
    err = _signal_at_the_first_step(proc, signal.SIGINT)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("dire-run: interrupted"), err


@pytest.mark.parametrize("door", ["dire-run", "patched script"])
def test_sigterm_is_one_line_143_and_the_failed_runs_manifest(env, tmp_path, door):
    import signal

    cache = tmp_path / "cache"
    if door == "dire-run":
        proc = _dire_run(env, tmp_path, "--real-data", str(env["data"]), "--cache-dir", str(cache),
                         args=LONG_ARGS, popen=True)
        prog = "dire-run"
    else:  # the .pth start-up line, as a batch scheduler's kill finds the upstream command
        assert dire_apply(["sre2l", str(env["root"]), "--real-data", str(env["data"]), "--cache-dir", str(cache)]) == 0
        proc = _run(env, tmp_path / "out", args=LONG_ARGS, popen=True)
        prog = "dire"
    before = _checkout_files(env["root"])
    err = _signal_at_the_first_step(proc, signal.SIGTERM)
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: terminated by SIGTERM (manifest of this run: {cache / 'runs'}"), err
    manifest = json.loads(Path(line.rsplit("manifest of this run: ", 1)[1].rstrip(")")).read_text())
    assert (manifest["status"], manifest["error"]) == ("failed", "Terminated: SIGTERM")
    assert manifest["terms_computed"] >= 1  # it ended inside the run, not before
    assert _checkout_files(env["root"]) == before
