"""dgplug.threads: the user's count, the per-call-size rule and the task runner."""

import threading

import pytest
import torch

from dgplug import threads


@pytest.fixture(autouse=True)
def _restore():
    before, user = torch.get_num_threads(), threads._user
    yield
    threads._user = user
    torch.set_num_threads(before)


def test_run_tasks_runs_each_task_once_single_threaded_and_restores():
    torch.set_num_threads(2)
    seen, names = [], set()
    lock = threading.Lock()

    def task(i):
        with lock:
            seen.append((i, torch.get_num_threads()))
            names.add(threading.current_thread().name)

    threads.run_tasks([lambda i=i: task(i) for i in range(9)], workers=3)
    assert sorted(i for i, _ in seen) == list(range(9))
    assert all(n == 1 for _, n in seen)  # torch ops single-threaded inside the workers
    assert torch.get_num_threads() == 2


def test_run_tasks_raises_the_tasks_error_and_restores():
    torch.set_num_threads(2)

    def bad():
        raise ValueError("task 3 failed")

    with pytest.raises(ValueError, match="task 3 failed"):
        threads.run_tasks([lambda: None, bad, lambda: None], workers=2)
    assert torch.get_num_threads() == 2


def test_run_tasks_stops_taking_tasks_after_an_error():
    """Ctrl-C or an error in one worker: the others finish the task in hand and take no other
    (before, they ran the whole queue out before the error reached the caller)."""
    ran = []

    def bad():
        raise KeyboardInterrupt

    def slow(i):
        ran.append(i)
        threading.Event().wait(0.01)

    with pytest.raises(KeyboardInterrupt):
        threads.run_tasks([bad] + [lambda i=i: slow(i) for i in range(200)], workers=2)
    assert len(ran) <= 3, len(ran)


def test_configure_user_choice_and_env(monkeypatch):
    monkeypatch.setenv(threads.ENV, "1")
    threads._user = None
    assert threads.configure() == 1 and threads.user_threads() == 1 and torch.get_num_threads() == 1
    assert threads.configure(2) == 2 and threads.user_threads() == 2
    monkeypatch.setenv(threads.ENV, "zero")
    threads._user = None
    with pytest.raises(ValueError, match="DGPLUG_THREADS='zero'"):
        threads.configure()


def test_a_thread_count_past_any_machine_is_refused(monkeypatch):
    """torch's OpenMP pool aborts ("libgomp: Thread creation failed") or segfaults at some 20000
    threads, and a count past int64 is torch's "Overflow when unpacking long long": one line instead."""
    threads._user = None
    for n in (threads.MAX_THREADS + 1, 100000, 10**20):
        with pytest.raises(ValueError, match=f"--threads={n}: give a whole number of threads from 1 to "
                                             f"{threads.MAX_THREADS}"):
            threads.configure(n)
    monkeypatch.setenv(threads.ENV, "100000")
    with pytest.raises(ValueError, match="DGPLUG_THREADS='100000'"):
        threads.configure()
    assert threads._user is None


def test_for_flops_narrows_small_calls_only():
    torch.set_num_threads(2)
    with threads.for_flops(threads.SMALL_FLOPS / 10):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads.for_flops(threads.SMALL_FLOPS * 10):
        assert torch.get_num_threads() == 2
    threads._user = 2  # a user's count is a budget: small calls still run on one thread
    with threads.for_flops(1e6):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_small_model_passes_run_single_threaded(monkeypatch):
    """The layer stack of a small model runs inside for_flops on one thread (what matters on a
    shared machine); the thread count is back afterwards."""
    from dgplug.assets import tiny_random_model_path
    import dgplug

    model = dgplug.load(tiny_random_model_path())
    seen = []
    orig = model.run_layers
    monkeypatch.setattr(model, "run_layers", lambda *a, **k: seen.append(torch.get_num_threads()) or orig(*a, **k))
    torch.set_num_threads(2)
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=model.cfg.canvas_length, max_denoising_steps=2, seed=0)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
