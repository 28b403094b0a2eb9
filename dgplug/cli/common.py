"""What every command shares: two consoles that never read markup, the one error funnel,
signals, threads and device.

Results (tables, generated text, JSON) go to stdout; messages (loading, progress, notes,
errors) go to stderr, so `dgplug generate ... > out.txt` keeps only the text. Neither console
interprets rich markup: user text, paths and exception messages print exactly as they are
(styles are applied with `Text(..., style=...)`, never with [tags]).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

out = Console(markup=False, highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True, emoji=False)
STATE = {"debug": False, "quiet": False}


class CLIError(Exception):
    """A bad argument or option, found before any work: printed as one line."""


class Terminated(BaseException):
    """SIGTERM in the main process, raised like KeyboardInterrupt is for SIGINT (cleanup runs)."""


def at_least(flag: str, value: int | None, low: int = 1, what: str = "a number") -> None:
    """A count option below its floor (None: not given) is one line naming the flag."""
    if value is not None and value < low:
        raise CLIError(f"{flag} {value}: give {what} >= {low}")


# The sampler builds its temperature schedule with an entry per step (int32 and fp32 tables, as
# transformers computes it): --steps 2**31 - 1 took 22 GB before the OOM killer ended it, 10**11
# failed to allocate 400 GB, 10**20 overflowed torch's int64 (with 60 lines of C++ frames). A million
# steps (forwards of the model per canvas; the checkpoints' default is 48) costs some 12 MB.
MAX_STEPS = 1_000_000


def steps_arg(steps: int | None) -> None:
    """--steps: at least 1, at most what the sampler counts (one line naming the value)."""
    at_least("--steps", steps)
    if steps is not None and steps > MAX_STEPS:
        raise CLIError(f"--steps {steps}: give a number from 1 to {MAX_STEPS}")


class LiveView:
    """A live view on stderr, transient (it vanishes when stopped); content taller than the
    terminal is cut to it, never left behind above the output. Drawn only from the caller's
    thread, at most `rate` times a second (rich's own refresh thread would redraw many times a
    second and take the GIL from the model being timed)."""

    def __init__(self, rate: float):
        from rich.live import Live

        self.live = Live(console=err, auto_refresh=False, transient=True, vertical_overflow="crop")
        self.gap, self.last = 1 / rate, float("-inf")
        self.live.start()

    def update(self, renderable, now: bool = False) -> None:
        """Show `renderable`: at once with now=True, else when 1/rate has passed since the last draw."""
        t = time.perf_counter()
        self.live.update(renderable)
        if now or t - self.last >= self.gap:
            self.live.refresh()
            self.last = time.perf_counter()

    def stop(self) -> None:
        self.live.stop()


def result_line(text: str) -> None:
    """A summary line on stdout: wrapped at words on a terminal, one line when piped."""
    out.print(text, soft_wrap=not out.is_terminal)


def print_text(text: str) -> None:
    """Generated text on stdout as it is (rich would expand its tabs and drop control characters)."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`| head`): end quietly, as rich does for its output
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except OSError as e:  # e.g. a full disk behind `> file`: say where
        e.dgplug_where = "stdout"
        raise


def say(*parts, style: str | None = None) -> None:
    """A message line on stderr (silenced by --quiet)."""
    if not STATE["quiet"]:
        err.print(Text(" ".join(str(p) for p in parts), style=style or ""))


def note(msg: str) -> None:
    """A line the user should see even with --quiet (e.g. that the output was cut)."""
    err.print(Text("note: ", style="yellow") + Text(msg))


def _click_class(name: str):
    """click's exception class `name`, as typer raises it (typer 0.29 carries its own copy of click)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


def main(app) -> None:
    """Run the typer app as the `dgplug` script: as click's standalone mode, except that a usage error
    (an unknown command or option, a missing or mistyped value) is one line naming the value, exit 2."""
    if sys.stdout is None:  # started with stdout closed (>&-): every result would be lost
        err.print(Text("error: ", style="red") + Text("stdout is closed: dgplug prints its results there"))
        raise SystemExit(1)
    try:
        code = app(prog_name="dgplug", standalone_mode=False)
    except _click_class("UsageError") as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `dgplug`: the help, as click prints it
            e.show()
            raise SystemExit(e.exit_code) from None
        usage_error(e)
    except _click_class("ClickException") as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except typer.Abort:  # Ctrl-C before a command runs (a running command exits 130 itself)
        err.print("Aborted!")
        raise SystemExit(1) from None
    raise SystemExit(code or 0)


def usage_error(e) -> None:
    """One line on stderr, naming the value at fault, and exit status 2 (as click and argparse):
    `error: Invalid value for '--max-new-tokens' / '-n': ... (got 'abc'); see: dgplug generate --help`."""
    text = " ".join(e.format_message().split()).rstrip(".")
    param = getattr(e, "param", None)
    if isinstance(e, typer.BadParameter) and param is not None and param.opts:
        args = sys.argv[1:]
        for i, a in enumerate(args):
            value = args[i + 1] if a in param.opts and i + 1 < len(args) else next(
                (a.split("=", 1)[1] for o in param.opts if a.startswith(o + "=")), None)
            if value is not None:
                text += "" if repr(value) in text else f" (got {value!r})"
                break
    where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "dgplug"
    err.print(Text("error: ", style="red") + Text(f"{text}; see: {where} --help"))
    raise SystemExit(2)


def message(e: BaseException) -> str:
    """One line for an exception: OSErrors name their file and say what happened in words."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else getattr(e, "dgplug_where", None)
        what = e.strerror[0].lower() + e.strerror[1:]
        return f"{where}: {what}" if where is not None else what
    if isinstance(e, typer.BadParameter):
        return e.format_message()
    text = str(e).split("\nException raised from ", 1)[0]  # torch's C++ frames follow that line
    return text or e.__class__.__name__


# -- signals ------------------------------------------------------------------------------------
# A handler that raises can land anywhere in the main thread, including inside the standard
# library's synchronisation code: between `Condition.__enter__` taking its lock and the `with`
# that would release it, or in `Condition.wait` restoring its lock. The exception then leaves the
# lock held (the pool's result thread blocks on it for ever, so `Pool.terminate()` hangs) or
# breaks it ("release unlocked lock"). So a signal that lands there waits: a trace function on the
# main thread raises it at the first line that runs with none of these modules on the stack (a
# blocking wait ends when its job does). A second SIGINT/SIGTERM while one waits raises at once.
_SYNC_MODULES = ("threading", "queue", "multiprocessing", "concurrent", "logging")
_caught: list[int] = []  # raised (cleanup under way)
_deferred: list = []  # [signum, trace function before ours, frames given ours]: raised at a safe line
_active = False


def _is_sync(frame) -> bool:
    return (frame.f_globals.get("__name__") or "").partition(".")[0] in _SYNC_MODULES


def _in_sync_code(frame) -> bool:
    while frame is not None:
        if _is_sync(frame):
            return True
        frame = frame.f_back
    return False


def _untrace():
    """Drop a held-back signal: the trace function before ours comes back, our frames lose theirs."""
    if _deferred:
        _, before, frames = _deferred
        _deferred.clear()
        sys.settrace(before)
        for f in frames:
            f.f_trace = None


def _raise(signum):
    _untrace()
    _caught.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()


def _at_safe_line(frame, event, arg):
    """The trace function while a signal waits: called for each new frame and line of the main thread."""
    if not _deferred or _caught:
        return None
    if _in_sync_code(frame):
        return None if event == "call" else _at_safe_line
    _raise(_deferred[0])


def _on_signal(signum, frame):
    if _caught:  # a second signal while cleaning up: let the cleanup finish
        return
    if _deferred or not _in_sync_code(frame):
        _raise(signum)
    frames, f = [], frame
    while f is not None:  # the callers waiting outside the sync code get line events
        if not _is_sync(f):
            f.f_trace = _at_safe_line
            frames.append(f)
        f = f.f_back
    _deferred[:] = [signum, sys.gettrace(), frames]
    sys.settrace(_at_safe_line)


def _after_fork_in_child():
    """A worker forked during a command (the converters' pools) leaves the terminal's process group,
    so Ctrl-C and `kill -- -PGID` reach the main process only, which ends its pool in order
    (multiprocessing's Pool deadlocks when a worker dies on its own holding the task queue's lock).
    The pool's own SIGTERM then ends the worker at once, with the default action: no Python handler
    (which can miss a signal that lands just before a blocking wait), no traceback."""
    if _active:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _untrace()  # a signal held back in the parent at the fork is the parent's
        try:
            os.setpgid(0, 0)
        except OSError:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def signals():
    """SIGINT and SIGTERM raise in the main process (so temporary outputs are removed), never inside
    the standard library's locking code (see above); forked workers are left to their parent (see
    _after_fork_in_child). Restores the handlers (and the trace function) afterwards."""
    global _active
    _caught.clear()
    _untrace()
    old = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, _on_signal)
    except ValueError:  # not the main thread: leave the handlers alone
        pass
    _active = True
    try:
        yield
    finally:
        _active = False
        _untrace()
        for s, h in old.items():
            signal.signal(s, h)


def run(fn, debug: bool = False, quiet: bool = False):
    """Call fn; any error becomes one line on stderr (exit 1) unless --debug; Ctrl-C exits 130, SIGTERM 143."""
    STATE["debug"] = STATE["debug"] or debug
    STATE["quiet"] = STATE["quiet"] or quiet
    # messages on a terminal wrap at words (and a live view wraps its long lines instead of
    # cutting them); piped, every message stays one line
    err.soft_wrap = not err.is_terminal
    try:
        with signals(), _threads_restored():
            check_settings()
            result = fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _stopped(signal.SIGINT)
    except Terminated:
        _stopped(signal.SIGTERM)
    except Exception as e:  # noqa: BLE001 - the CLI's single error funnel
        if _caught and not STATE["debug"]:  # the signal, re-raised as another error by a library
            _stopped(_caught[0])
        if STATE["debug"]:
            raise
        err.print(Text("error: ", style="red") + Text(message(e)))
        raise typer.Exit(1) from None
    if _caught:  # the signal was swallowed by a library (an import's `except`): the run did not end as asked
        _stopped(_caught[0])
    return result


def _stopped(signum: int):
    err.print(Text("interrupted" if signum == signal.SIGINT else "terminated", style="red"))
    raise typer.Exit(130 if signum == signal.SIGINT else 143) from None


# -- threads, device, backend -------------------------------------------------------------------
@contextmanager
def _threads_restored():
    """A command's thread choice ends with it (matters when commands run in one process, as in tests)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    from dgplug import threads

    before = (threads._user, torch.get_num_threads())
    try:
        yield
    finally:
        threads._user = before[0]
        torch.set_num_threads(before[1])


def check_settings() -> None:
    """Every DGPLUG_* switch that is set takes one of its values (dgplug.settings), and DGPLUG_MOE_CONFIG
    parses, before any work: a typo would otherwise be ignored, or found after a model has loaded."""
    from dgplug import settings

    try:
        settings.check_all()
        if os.environ.get("DGPLUG_MOE_CONFIG", "").strip():
            from dgplug.kernels.moe import env_config

            env_config()
    except Exception as e:  # noqa: BLE001 - one line naming the variable
        raise CLIError(str(e)) from None


def threads_arg(n: int | None) -> int | None:
    """--threads N, else DGPLUG_THREADS, checked before any work; None: dgplug's policy decides."""
    from dgplug.threads import ENV, _parse

    try:
        if n is not None:
            return _parse(n, "--threads")
        if os.environ.get(ENV):
            return _parse(os.environ[ENV], ENV)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return None


def set_threads(n: int | None, work_params: int | None = None) -> int:
    """Apply the thread count: the user's (--threads / DGPLUG_THREADS) if any, else the policy,
    given the size of the work (parameters of the model) when known. Returns the count."""
    from dgplug import threads

    if n is not None or os.environ.get(threads.ENV):
        return threads.configure(n)
    return threads.configure(None) if work_params is None else _policy(work_params)


# Below this, one thread: on 2 cores one thread ran 8-27x faster than two for models of 0.4M, 1.9M
# and 52M parameters, quiet and loaded (benchmarks/cli_threads.py; the "quiet" machine was at load
# 11-17). Where more threads start to pay is not measured; larger models get dgplug's policy.
SMALL_MODEL_PARAMS = 60_000_000


def _policy(params: int) -> int:
    """dgplug's default for a model of `params` parameters (see benchmarks/cli_threads.py)."""
    import torch

    from dgplug import threads

    n = threads.configure(None)
    if params < SMALL_MODEL_PARAMS:
        n = 1
        torch.set_num_threads(n)
    return n


def device_arg(device: str | None) -> str | None:
    """--device: cpu, cuda or cuda:N; checked against what torch sees."""
    if device is None or device == "cpu":
        return device
    import torch

    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise CLIError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CLIError(f"--device {device}: torch sees no CUDA device")
    if index and int(index) >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device
