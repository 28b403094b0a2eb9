"""How many CPU threads dgplug's torch ops use.

One place decides: `configure(n)` is what `--threads N` (CLI) and `DGPLUG_THREADS` set; without
either, dgplug applies its own default policy (`default_threads`: the cores this process may
run on). That count is a budget, spent two ways:

* Small calls run on one thread (`for_flops`): below SMALL_FLOPS per op, a second intra-op
  thread costs more than it saves, and on a shared machine every op waits at its barrier for
  the slower thread (a descheduled one: milliseconds). The layer stack of a small model is such
  a call (`DiffusionGemma.run_layers`). This rule narrows, never widens, and applies under a
  user's count too.
* The CPU head + sampler runs its row chunks as tasks on that many worker threads with
  single-threaded ops inside (`run_tasks`): no op-level barriers at all, and a worker slowed
  by another process leaves its share of the queue to the others.

Code that knows better can narrow the count for a block with `for_work(...)`, which a user's
explicit choice overrides.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

ENV = "DGPLUG_THREADS"
_user: int | None = None  # set by configure() from --threads or DGPLUG_THREADS


# More than any machine's cores: past some 20000 torch's OpenMP pool aborts ("libgomp: Thread
# creation failed") or segfaults, a count past int64 is torch's "Overflow when unpacking long long",
# and GGUF conversion starts one process per thread.
MAX_THREADS = 1024


def _parse(value: str | int, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r}: give a whole number of threads >= 1") from None
    if n < 1:
        raise ValueError(f"{where}={value!r}: give a whole number of threads >= 1")
    if n > MAX_THREADS:
        raise ValueError(f"{where}={value!r}: give a whole number of threads from 1 to {MAX_THREADS}")
    return n


def default_threads() -> int:
    """dgplug's choice when the user gives none: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure(n: int | None = None) -> int:
    """Set torch's intra-op threads: n if given, else DGPLUG_THREADS, else the default policy.

    Returns the count in force. An explicit n or DGPLUG_THREADS is remembered as the user's
    choice, which `for_work` never overrides.
    """
    import torch

    global _user
    if n is not None:
        _user = _parse(n, "--threads")
    elif os.environ.get(ENV):
        _user = _parse(os.environ[ENV], ENV)
    count = _user if _user is not None else default_threads()
    torch.set_num_threads(count)
    return count


# Below this many FLOPs per op, one thread. `python benchmarks/sampler.py --thread-sweep` (one
# op at 1 and 2 intra-op threads, alternated, medians of 5) on a 2-core AVX2 EPYC shared with
# other work (load average 16-17): fp32 matmuls of 8 MFLOP 0.13 vs 40 ms, 34 MFLOP 0.42 vs
# 0.51 ms, 134 MFLOP 2.3 vs 2.0 ms, 268 MFLOP 17 vs 27 ms, 1.1 GFLOP 57 vs 99 ms, 4.1 GFLOP
# 190 vs 248 ms, 32 GFLOP 1556 vs 1570 ms; tanh over 2^17 elements 0.57 vs 13.5 ms, over 2^23
# 206 vs 245 ms. On a shared machine a second thread never paid, and at small sizes it cost
# 10-300x (each op waits for a descheduled thread). Idle machines gain up to 2x from it on
# large ops. The line sits where a small model's layer stack (hidden 256: 67 MFLOP per
# projection at 512 tokens) stays single-threaded and the release's (hidden 2816: 4 GFLOP at
# 256 tokens) does not.
SMALL_FLOPS = 1e9
_exact = threading.local()  # .on: for_flops keeps the count in force (same numerics as transformers)


@contextlib.contextmanager
def as_transformers():
    """Within this block for_flops narrows nothing: ops run on the thread count transformers
    runs them on, so fp32 sums (whose order depends on the thread count) match its bits. For
    rng="transformers", whose promise is transformers' tokens, token for token."""
    was = getattr(_exact, "on", False)
    _exact.on = True
    try:
        yield
    finally:
        _exact.on = was


@contextlib.contextmanager
def for_flops(flops: float):
    """Run a block whose ops each do about `flops` FLOPs: on one thread below SMALL_FLOPS,
    else with the count in force (always the count in force inside as_transformers())."""
    import torch

    before = torch.get_num_threads()
    if flops >= SMALL_FLOPS or before == 1 or getattr(_exact, "on", False):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def user_threads() -> int | None:
    """The user's explicit thread count, or None when dgplug's policy decides."""
    return _user


@contextlib.contextmanager
def for_work(threads: int):
    """Run a block with `threads` intra-op threads unless the user fixed the count."""
    import torch

    if _user is not None or threads == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_tasks(tasks, workers: int) -> None:
    """Run independent callables on `workers` threads (the calling thread is one), each taking
    the next task from a shared queue, with torch ops single-threaded inside: parallel across
    tasks, not inside ops, so a core taken by another process slows one worker (the others take
    its share of the queue) instead of stalling every op at its barrier. The calling thread's
    torch thread count is restored afterwards; the first exception is raised, and after one (or
    Ctrl-C) no worker starts another task."""
    import torch

    before = torch.get_num_threads()
    grad = torch.is_grad_enabled()  # grad mode is per thread: workers take the caller's
    pending = iter(tasks)
    lock = threading.Lock()
    stop: list[bool] = []  # an error or Ctrl-C anywhere: the others take no further task

    def worker():
        torch.set_num_threads(1)
        torch.set_grad_enabled(grad)
        while not stop:
            with lock:
                task = next(pending, None)
            if task is None:
                return
            try:
                task()
            except BaseException:
                stop.append(True)
                raise

    try:
        if workers <= 1:
            worker()
            return
        with ThreadPoolExecutor(workers - 1, thread_name_prefix="dgplug") as pool:
            others = [pool.submit(worker) for _ in range(workers - 1)]
            try:
                worker()
                for f in others:
                    f.result()
            except BaseException:
                stop.append(True)
                raise
    finally:
        torch.set_num_threads(before)
