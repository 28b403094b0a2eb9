"""`dgplug convert` (issue 14, items 4, 5 and 8): one overwrite rule, SIGINT/SIGTERM on a real
conversion (main process and workers), a full disk named in one line."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from dgplug.cli import app

runner = CliRunner()
CLI = [sys.executable, "-c", "from dgplug.cli import app; app()"]


# -- item 5: overwrite ---------------------------------------------------------------------------
def test_overwrite_rule(tiny_ckpt_smooth, tmp_path):
    src = str(tiny_ckpt_smooth)
    g = tmp_path / "m.gguf"
    g.write_bytes(b"keep me")
    r = runner.invoke(app, ["convert", src, str(g), "-q", "Q8_0"])
    assert r.exit_code == 1 and f"{g} exists: pass --overwrite to replace it" in r.stderr, r.output
    assert g.read_bytes() == b"keep me"
    r = runner.invoke(app, ["convert", src, str(g), "-q", "Q8_0", "--overwrite", "--quiet"])  # not a GGUF: kept
    assert r.exit_code == 1 and f"{g} is not a GGUF file: --overwrite replaces an earlier GGUF" in r.stderr
    assert g.read_bytes() == b"keep me"
    g.unlink()
    assert runner.invoke(app, ["convert", src, str(g), "-q", "F16", "--quiet"]).exit_code == 0
    r = runner.invoke(app, ["convert", src, str(g), "-q", "Q8_0", "--overwrite", "--quiet"])  # an earlier GGUF
    assert r.exit_code == 0 and g.read_bytes()[:4] == b"GGUF", r.output
    d = tmp_path / "q"
    d.mkdir()
    (d / "old.txt").write_text("keep me")
    r = runner.invoke(app, ["convert", src, str(d), "-q", "int8"])
    assert r.exit_code == 1 and f"{d} exists: pass --overwrite to replace it" in r.stderr
    assert "overwrite=True" not in r.output and (d / "old.txt").exists()
    r = runner.invoke(app, ["convert", src, str(d), "-q", "int8", "--overwrite", "--quiet"])  # other files: kept
    assert r.exit_code == 1 and f"{d} is not a dgplug-quantized directory" in r.stderr and (d / "old.txt").exists()
    (d / "old.txt").unlink()
    assert runner.invoke(app, ["convert", src, str(d), "-q", "int4", "--quiet"]).exit_code == 0
    r = runner.invoke(app, ["convert", src, str(d), "-q", "int8", "--overwrite", "--quiet"])  # an earlier output
    assert r.exit_code == 0 and '"int8"' in (d / "config.json").read_text(), r.output
    # a GGUF name for a directory format, a directory for a GGUF type: refused, nothing made
    r = runner.invoke(app, ["convert", src, str(tmp_path / "x.gguf"), "-q", "int8"])
    assert r.exit_code == 1 and "writes a directory" in r.stderr and not (tmp_path / "x.gguf").exists()
    r = runner.invoke(app, ["convert", src, str(d), "-q", "Q8_0", "--overwrite"])
    assert r.exit_code == 1 and "writes one GGUF file" in r.stderr and (d / "config.json").exists()


# -- item 4: signals -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """~25M parameters (fp32, ~100 MB): a Q4_K_M conversion takes seconds and uses the worker pool."""
    from dgplug.testing import make_checkpoint, tiny_text_config

    text = tiny_text_config(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_experts=16, moe_intermediate_size=256, head_dim=64, global_head_dim=128)
    return make_checkpoint(tmp_path_factory.mktemp("big") / "ckpt", text=text, qk_norm_scale=0.25)


def _hidden(d):
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _convert_and_signal(cmd, out_dir, sig, group: bool, env=None):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(os.environ, **(env or {})))
    deadline = time.time() + 240
    while not _hidden(out_dir):  # the temporary output exists: the conversion is under way
        assert p.poll() is None, f"conversion ended before the signal: {p.communicate()}"
        assert time.time() < deadline, "no temporary output appeared"
        time.sleep(0.05)
    time.sleep(0.5)
    workers = _children(p.pid)
    assert p.poll() is None, "conversion finished before the signal: make the model bigger"
    if group:  # Ctrl-C in a terminal, docker/systemd stopping a control group: every process gets it
        os.killpg(p.pid, sig)
    else:  # `kill PID`: the main process only
        os.kill(p.pid, sig)
    stdout, stderr = p.communicate(timeout=120)
    time.sleep(0.5)
    assert all(_gone(w) for w in workers), "a worker outlived the conversion"
    return p.returncode, stderr, workers


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)],
                         ids=["term-main", "term-group", "int-group"])
def test_signal_during_gguf_export(big_ckpt, tmp_path, sig, group):
    rc, stderr, workers = _convert_and_signal(CLI + ["convert", str(big_ckpt), str(tmp_path / "m.gguf"), "-q",
                                                     "Q4_K_M"], tmp_path, sig, group)
    if (os.cpu_count() or 1) >= 2:
        assert len(workers) >= 2  # the worker pool was there (default: min(2, cores) workers)
    want = ("terminated", 143) if sig == signal.SIGTERM else ("interrupted", 130)
    assert rc == want[1], stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == want[0]
    assert f"{tmp_path / 'm.gguf'}: not written; its temporary files were removed" in stderr, stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # neither the output nor its temporary file


def test_sigterm_during_quantize(big_ckpt, tmp_path):
    """int8 writes a directory; a short pause per tensor (injected) keeps it mid-conversion."""
    slow = ("import time\nimport dgplug.converters.quant as Q\nf = Q._convert_job\n"
            "Q._convert_job = lambda *a, **k: (time.sleep(0.05), f(*a, **k))[1]\n"
            "from dgplug.cli import app\napp()")
    rc, stderr, _ = _convert_and_signal([sys.executable, "-c", slow, "convert", str(big_ckpt), str(tmp_path / "q8"),
                                      "-q", "int8"], tmp_path, signal.SIGTERM, False)
    assert rc == 143 and "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "terminated", stderr
    assert list(tmp_path.iterdir()) == []


def _killer(delay):
    """A thread (not started) that sends this process SIGTERM `delay` seconds after it starts.
    Start it inside `signals()`: a SIGTERM before the handler is in place would end pytest."""
    import threading

    return threading.Thread(target=lambda: (time.sleep(delay), os.kill(os.getpid(), signal.SIGTERM)))


def test_a_signal_never_breaks_a_lock():
    """The CI hang: SIGTERM landed between `Condition.__enter__` taking its lock and the `with`
    releasing it, so the pool's result thread blocked for ever and `Pool.terminate()` with it.
    A tight loop over `Event.wait` (a Condition inside) is hit at random points: before the fix
    about one try in four left the lock held or failed with "release unlocked lock"."""
    import threading

    from dgplug.cli import common

    for i in range(120):
        ev = threading.Event()
        t = _killer(0.001 + (i % 13) * 0.0004)
        with pytest.raises(common.Terminated):
            with common.signals():
                t.start()
                while True:
                    ev.wait(0)
        t.join()
        assert sys.gettrace() is None
        assert ev._cond._lock.acquire(timeout=1), f"try {i}: the Condition's lock was left held"
        ev._cond._lock.release()


def test_a_signal_in_a_wait_is_raised_when_the_wait_ends():
    """Inside the standard library's wait the signal waits, and is raised at the first line after
    the wait; a second one raises at once; nothing of it outlives the command."""
    import threading

    from dgplug.cli import common

    ev = threading.Event()
    t0, after, t = time.perf_counter(), [], _killer(0.05)
    with pytest.raises(common.Terminated):
        with common.signals():
            t.start()
            ev.wait(0.4)  # blocked in threading.Condition.wait when the signal comes
            after.append("not raised")  # the first line after the wait: raised as it starts
    t.join()
    assert after == [] and 0.35 < time.perf_counter() - t0 < 0.8
    t0, t, t2 = time.perf_counter(), _killer(0.05), _killer(0.15)
    with pytest.raises(common.Terminated):
        with common.signals():
            t.start(), t2.start()
            ev.wait(3)
    t.join(), t2.join()
    assert time.perf_counter() - t0 < 1.0, "the second signal did not raise at once"
    assert sys.gettrace() is None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# -- item 8: a full disk -------------------------------------------------------------------------
def _private_mount_prefix():
    """A command prefix that runs its argument in a private mount namespace, or None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        ok = subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                            capture_output=True)
        if ok.returncode == 0:
            return prefix
    return None


def _convert_on_tmpfs(src, mnt, options: str, quant: str, then: str = ""):
    """`dgplug convert src mnt/m.gguf -q quant` in a private mount namespace where mnt is a tmpfs
    mounted with `options` (skips where no such namespace can be made); prints RC=<exit code>."""
    prefix = _private_mount_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm): cannot mount a small filesystem")
    mnt.mkdir()
    cli = " ".join(f"'{c}'" for c in CLI)
    script = f"mount -t tmpfs -o {options} tmpfs '{mnt}' && {cli} convert '{src}' '{mnt}/m.gguf' -q {quant}; " \
             f"echo RC=$?; {then}"
    return subprocess.run(prefix + ["sh", "-c", script], capture_output=True, text=True, timeout=300)


def test_full_disk_during_gguf_export(tiny_ckpt_smooth, tmp_path):
    mnt = tmp_path / "small"
    r = _convert_on_tmpfs(tiny_ckpt_smooth, mnt, "size=256k", "F32", then=f"ls -A '{mnt}'")
    assert f"error: {mnt}/m.gguf: no space left on device\n" in r.stderr, (r.stdout, r.stderr)
    assert "RC=1" in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.split("RC=1")[1].strip() == ""  # nothing left on the full filesystem


def test_overwrite_never_takes_the_source_or_the_working_directory(tiny_ckpt_smooth, tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    src = parent / "ck"
    shutil.copytree(tiny_ckpt_smooth, src)
    (parent / "notes.txt").write_text("keep me")
    r = runner.invoke(app, ["convert", str(src), str(parent), "-q", "int8", "--overwrite"])
    assert r.exit_code == 1 and f"{parent} holds the source {src}: choose another output" in r.stderr, r.output
    assert (src / "config.json").exists() and (parent / "notes.txt").read_text() == "keep me"
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    for out in (".", str(work)):
        r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), out, "-q", "int8", "--overwrite"])
        assert r.exit_code == 1 and "holds the current directory: choose another output" in r.stderr, r.output
    assert (work / "sub").is_dir()


@pytest.mark.parametrize("quant,out", [("Q8_0", "m.gguf"), ("int8", "q8")])
def test_progress_goes_to_stderr(tiny_ckpt_smooth, tmp_path, quant, out):
    """stdout keeps the result line only; the progress bar is on stderr (README: Command line)."""
    target = tmp_path / out
    p = subprocess.run(CLI + ["convert", str(tiny_ckpt_smooth), str(target), "-q", quant], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"wrote {target}", p.stdout
    assert quant in p.stderr
    assert "━" not in p.stderr and "MB/s" not in p.stderr, p.stderr  # piped: no bar frame left in a log


@pytest.mark.parametrize("quant,name", [("Q8_0", "m.gguf"), ("int8", "q8")])
def test_output_folder_checked_before_any_work(tiny_ckpt_smooth, tmp_path, quant, name):
    """OUT's folder must exist and take a file: one line naming OUT, before the source is read,
    and no folder is created on the way (a typo in a path once became a new directory)."""
    missing = tmp_path / "no" / "such"
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(missing / name), "-q", quant])
    assert r.exit_code == 1 and r.stderr == f"error: {missing / name}: no such directory {missing} (create it first)\n"
    assert not (tmp_path / "no").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(afile / name), "-q", quant])
    assert r.exit_code == 1 and f"{afile} is not a directory" in r.stderr, r.output
    r = runner.invoke(app, ["imatrix", str(tiny_ckpt_smooth), "--calib", str(afile), "-o", str(missing / "i.gguf")])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: -o {missing / 'i.gguf'}: no such directory"), r.output


def test_read_only_output_folder_named_not_the_temporary_file(tiny_ckpt_smooth, tmp_path):
    mnt = tmp_path / "ro"
    r = _convert_on_tmpfs(tiny_ckpt_smooth, mnt, "ro,size=64k", "Q8_0")
    assert r.stderr.endswith(f"error: {mnt}/m.gguf: cannot write in {mnt} (read-only file system)\n"), r.stderr
    assert "RC=1" in r.stdout and "converting" not in r.stderr


@pytest.mark.parametrize("tensor_column", [False, True])
def test_progress_bar_fits_the_terminal(tensor_column):
    """At any width from 50 columns the line (description, bar, bytes, speed, ETA, tensor) fits and
    the bar and the figures stay (int4 at 100 columns once showed the tensor name alone); the last
    two columns stay free (a full line plus the `^C` a terminal echoes wrapped, and a second bar
    stayed behind on Ctrl-C)."""
    import io

    from rich.console import Console

    from dgplug.converters import progress as cp

    for width in (50, 60, 80, 100, 120, 160, 240):
        desc, bar, tensor = cp._widths(width, 8 if tensor_column else 40, tensor_column)
        assert bar >= 10 and desc >= 6 and desc + bar + cp._FIGURES + 2 + (tensor + 1 if tensor else 0) <= width
        assert (tensor > 0) == (tensor_column and width >= 80)
        buf = io.StringIO()
        con = Console(file=buf, width=width, color_system=None)
        p = cp.conversion_progress(True, tensor_column, console=con)
        clock = [0.0]
        p.get_time = lambda: clock[0]  # a speed and a time left, as in a real run: the widest figures
        t = p.add_task("blk.12.ffn_gate_up_exps.weight Q4_K", total=944.6e6, tensor="model.decoder.layers.0.experts.x")
        for _ in range(6):
            clock[0] += 1.0
            p.advance(t, 49.9e6)
        con.print(p.get_renderable())
        line = buf.getvalue().rstrip("\n")
        assert "299.4/944.6 MB 49.9 MB/s 0:00:13" in line and "━" in line, (width, line)
        assert "\n" not in line and len(line) <= width - 2, (width, line)


def test_quantized_source_and_gguf_without_extension(tiny_ckpt_smooth, tmp_path):
    """A dgplug-quantized folder as SRC is named as such, by both converters, before anything is
    written (GGUF once failed on the first missing tensor); a GGUF output without .gguf gets a note."""
    q = tmp_path / "q8"
    assert runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(q), "-q", "int8"]).exit_code == 0
    for quant, out in (("Q8_0", "x.gguf"), ("int4", "x4")):
        r = runner.invoke(app, ["convert", str(q), str(tmp_path / out), "-q", quant])
        assert r.exit_code == 1 and r.stderr.endswith(
            f"error: {q / 'config.json'}: checkpoint is already quantized (quantization_config quant_method="
            f"'dgplug'); convert from the original bf16 checkpoint\n"), r.output
        assert not (tmp_path / out).exists()
    r = runner.invoke(app, ["convert", str(tiny_ckpt_smooth), str(tmp_path / "plain"), "-q", "Q8_0", "--quiet"])
    assert r.exit_code == 0 and "note: " in r.stderr and "no .gguf extension" in r.stderr
    assert (tmp_path / "plain").read_bytes()[:4] == b"GGUF"


def test_a_signal_a_library_swallows_or_rewraps_still_ends_the_command(capsys):
    """A signal raised inside code that catches it (transformers' lazy imports turn it into another
    error; some code swallows it) still ends the command as that signal: 143 and "terminated",
    not a misleading error about the user's files, and not a run that carries on to exit 0."""
    import typer

    from dgplug.cli import common

    def swallowed():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
        except BaseException:  # noqa: BLE001
            pass
        return "done"

    def rewrapped():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
        except BaseException as e:  # noqa: BLE001
            raise RuntimeError("tiny: tokenizer files present but unreadable") from e

    for fn in (swallowed, rewrapped):
        with pytest.raises(typer.Exit) as e:
            common.run(fn)
        err = capsys.readouterr().err
        assert e.value.exit_code == 143 and err.strip() == "terminated", (fn.__name__, err)
    assert common.run(lambda: "done") == "done"  # and a later command is not taken for interrupted


def test_ctrl_c_outside_a_command_exits_quietly():
    """Ctrl-C while the script starts, or while it exits after printing its result: exit 130, what was
    printed kept, no Python traceback (neither KeyboardInterrupt's nor an atexit callback's)."""
    start = ("import os, signal, sys, time; sys.argv[0] = '/venv/bin/dgplug'; import dgplug.cli; "
             "os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('not reached')")
    end = ("import atexit, os, signal, sys, time; sys.argv = ['dgplug', '--version']; "
           "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5))); "
           "from dgplug.cli import entry; entry()")
    for code, printed in ((start, ""), (end, "dgplug 0.1.0\n")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 130 and r.stdout == printed, (r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_dry_run_plans_what_a_conversion_writes(tiny_ckpt_smooth, tmp_path, monkeypatch):
    # --dry-run (llama-quantize's): the table's tensors per type are those the real conversion writes,
    # and nothing is written; OUT may be left out only then
    import re

    from gguf import GGUFReader
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    src = str(tiny_ckpt_smooth)

    def table(args):
        r = runner.invoke(app, ["convert", src, *args, "--dry-run"])
        assert r.exit_code == 0 and r.stdout.splitlines()[-1].endswith("nothing written (--dry-run)"), r.output
        return {m[1]: int(m[2]) for m in re.finditer(r"^ (\S+(?: \(kept\))?) +(\d+) ", r.stdout, re.M)}

    plan = table(["-q", "Q4_K_M", "--tensor-type", "attn_q=q8_0"])
    assert runner.invoke(app, ["convert", src, "m.gguf", "-q", "Q4_K_M", "--tensor-type", "attn_q=q8_0",
                               "--quiet"]).exit_code == 0
    written = {}
    for t in GGUFReader(tmp_path / "m.gguf").tensors:
        written[t.tensor_type.name] = written.get(t.tensor_type.name, 0) + 1
    assert plan == written and "Q8_0" in plan
    plan = table(["-q", "int4", "out-ignored"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the dry runs wrote nothing
    assert runner.invoke(app, ["convert", src, "q", "-q", "int4", "--quiet"]).exit_code == 0
    names = [k for p in (tmp_path / "q").glob("*.safetensors") for k in safe_open(str(p), "pt").keys()]
    qweights = sum(k.endswith(".qweight") for k in names)
    kept = len(names) - 3 * qweights  # an int4 weight is its qweight, scale and zero
    assert plan == {"int4": qweights, "F32 (kept)": kept}
    r = runner.invoke(app, ["convert", src, "-q", "Q8_0"])
    assert r.exit_code == 2 and "Missing argument 'OUT' (only --dry-run goes without one)" in r.stderr, r.output
