"""The denoise step on static buffers (dgplug.denoise_step), run eagerly on the CPU: the same
decoder states as the KVCache path, device-made RNG keys with the same bits, no state carried
from one generate call into the next. The GPU check replays it as a CUDA graph."""

import pytest
import torch

import dgplug
from dgplug import denoise_step
from dgplug import sampler as sp
from dgplug.kernels.sampler import canvas_row_keys, canvas_row_keys_device, counter_tokens, seed_key
from dgplug.model import KVCache
from dgplug.testing import HOST_SYNC, OpProbe


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return dgplug.load(tiny_ckpt, dtype="fp32")


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**40 + 3, 2**64 - 1])
@pytest.mark.parametrize("step", [0, 1, 255, 2**31 + 5])
def test_device_keys_equal_host_keys(seed, step):
    want = canvas_row_keys(seed, step, 300, row_offset=17)
    got = canvas_row_keys_device(torch.tensor([seed_key(seed)]), torch.tensor([step]), 300, row_offset=17)
    assert torch.equal(got, want)


def test_counter_noise_is_uniform_and_keyed():
    keys = canvas_row_keys(3, 1, 200_000)
    tok = counter_tokens(keys, 1000)
    assert int(tok.min()) >= 0 and int(tok.max()) < 1000
    counts = torch.bincount(tok, minlength=1000).float()
    assert float(counts.std() / counts.mean()) < 0.1  # 200 per bin: Poisson spread ~0.07
    assert not torch.equal(tok, counter_tokens(canvas_row_keys(3, 2, 200_000), 1000))


def test_temperature_table_matches_scalar_schedule():
    step = denoise_step.DenoiseStep.__new__(denoise_step.DenoiseStep)
    step.N, step.temps = 48, torch.zeros(49)
    step.seed, step.bound, step.confidence = torch.zeros(1, dtype=torch.long), torch.zeros(()), torch.zeros(())
    step.step, step.forwards, step.finished = torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(1)
    step.B, step.order = 1, torch.zeros(1, dtype=torch.long)
    step.start(seed=1, bound=0.1, confidence=0.005, t_min=0.4, t_max=0.8)
    for n in range(49):
        assert torch.equal(step.temps[n], sp.temperature(n, 48, 0.4, 0.8))


def encoded_prompt(model, B, prompt_len, padded):
    """A random prompt (row 1 left-padded by 3 when `padded`) through the encoder: (mask, KVCache)."""
    ids = torch.randint(5, model.tc.vocab_size, (B, prompt_len))
    mask = torch.ones(B, prompt_len, dtype=torch.bool)
    if padded:
        mask[1, :3] = False
    cache = KVCache.empty(model.tc.num_hidden_layers)
    model.encode(ids, cache, mask if padded else None)
    return mask, cache


@pytest.mark.parametrize("prompt_len,padded", [(5, False), (9, True), (40, True)])
def test_static_cache_denoise_equals_kvcache(model, prompt_len, padded):
    """Decoder states over [static cache; canvas] = over [KVCache; canvas], with left padding
    and with a prompt longer than the sliding window (static sliding slots = window - 1)."""
    torch.manual_seed(prompt_len)
    tc, C, B = model.tc, model.cfg.canvas_length, 2
    mask, cache = encoded_prompt(model, B, prompt_len, padded)
    canvas = torch.randint(0, tc.vocab_size, (B, C))
    soft = torch.randn(B, C, tc.hidden_size)
    dmask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool)], 1) if padded else None
    want = model.denoise(canvas, cache, sc_soft=soft, mask=dmask)
    static = denoise_step.StaticKVCache(model, B, denoise_step.capacity_bucket(prompt_len), model.device)
    static.load(cache, dmask)
    got = model.denoise(canvas, static, sc_soft=soft)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_zero_self_conditioning_is_no_self_conditioning(model):
    """The static step feeds zeros on a canvas's first step; that is exactly no self-conditioning."""
    canvas = torch.randint(0, model.tc.vocab_size, (2, model.cfg.canvas_length))
    zeros = torch.zeros(2, model.cfg.canvas_length, model.tc.hidden_size)
    assert torch.equal(model.self_conditioning_input(canvas, sc_soft=zeros), model.self_conditioning_input(canvas))


def test_first_step_draft_is_the_reference_argmax(model):
    """Step 1 of generate: the draft is the argmax of transformers-order logits of that canvas."""
    ids = torch.tensor([[5, 6, 7, 8]])
    seen = []
    model.generate(ids, max_new_tokens=16, max_denoising_steps=3, seed=4, on_step=seen.append)
    step = model._denoise_steps[next(reversed(model._denoise_steps))]
    keys = canvas_row_keys(4, denoise_step.NOISE_STEP, 16)
    first_canvas = counter_tokens(keys, model.tc.vocab_size).view(1, 16)
    logits = model(input_ids=ids, decoder_input_ids=first_canvas).logits
    assert step.B == 1 and torch.equal(seen[0].draft, logits.argmax(-1))


def test_reused_buffers_carry_nothing_between_calls(model):
    """A second call on the same static buffers (other seed, bound, steps left, finished rows)
    gives what a fresh model object gives."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    kw = dict(max_new_tokens=64, max_denoising_steps=4)
    model.__dict__.pop("_denoise_steps", None)
    fresh = model.generate(ids, seed=21, **kw)
    model.__dict__.pop("_denoise_steps", None)
    model.generate(ids, seed=3, entropy_bound=5.0, eos_token_id=[5, 6, 7], **kw)  # other state, same buffers
    assert len(model._denoise_steps) == 1
    again = model.generate(ids, seed=21, **kw)
    assert torch.equal(again.sequences, fresh.sequences)
    assert torch.equal(again.forwards, fresh.forwards) and again.steps == fresh.steps


def _with_experts(model, experts: str):
    """A copy of the model whose experts are int4 in the fragments order (as dgplug.load leaves them
    on a GPU; K tiles of 32 at this size) or fp8."""
    import copy

    from dgplug.kernels.moe import QuantizedWeight, repack_int4_fragments

    m = copy.deepcopy(model)
    for layer in m.layers:
        for n in ("gate_up_proj", "down_proj"):
            w = getattr(layer.experts, n).data
            if experts == "int4 fragments":
                q = repack_int4_fragments(QuantizedWeight.quantize(w, "int4", group_size=32), 32)
            else:
                q = QuantizedWeight.quantize(w, "fp8")
            delattr(layer.experts, n)
            setattr(layer.experts, n, q)
    return m


@pytest.mark.parametrize("backend,experts", [("kernels", "dense"), ("reference", "dense"),
                                             ("kernels", "int4 fragments"), ("kernels", "fp8 activations")])
def test_step_on_the_kernels_never_syncs(model, monkeypatch, backend, experts):
    """The step and the commit's encoder pass as a GPU runs them (every hot op on dgplug.kernels:
    Triton in the interpreter here), on the whole batch and on the rows left after one settled,
    dispatch no operation that syncs with the host: with dense experts, int4 experts in the
    fragments order, and fp8 experts with fp8 activations. The references do (the MoE twin's loop
    over the experts hit), which shows the probe sees them."""
    monkeypatch.setattr(dgplug.ops, "BACKEND", backend)
    monkeypatch.setenv("DGPLUG_KERNELS", "triton" if backend == "kernels" else "torch")
    monkeypatch.setenv("DGPLUG_FP8_ACTIVATIONS", "1" if experts == "fp8 activations" else "0")
    model = model if experts == "dense" else _with_experts(model, experts)
    tc, B = model.tc, 2
    cache = KVCache.empty(tc.num_hidden_layers)
    model.encode(torch.randint(5, tc.vocab_size, (B, 9)), cache, None)
    step = denoise_step.DenoiseStep(model, B, 256, 4, 1, torch.device("cpu"))
    step.start(seed=1, bound=0.1, confidence=0.005, t_min=0.4, t_max=0.8)
    step.start_canvas(0, cache, None)
    probe = OpProbe()
    with probe:
        step.run()
        step.commit(step.argmax.clone())  # the encoder's pass over a committed canvas: a graph too
    step.frozen[0] = True  # row 0 settles: the step and the commit then compute row 1 alone (graphs of their own)
    step.settle(1)
    assert step.n == 1 and step.order.tolist() == [1, 0]
    compacted = OpProbe()
    with compacted:
        step.run()
        step._commit()
    for seen in (probe.seen, compacted.seen):
        synced = {k: v for k, v in seen.items() if k in HOST_SYNC}
        assert sum(seen.values()) > 500
        if backend == "kernels":
            assert not synced, synced
        else:
            assert synced.get("nonzero", 0) >= tc.num_hidden_layers, synced


@pytest.mark.parametrize("prompt_len,padded", [(5, False), (9, True), (40, True)])
def test_static_commit_equals_kvcache_encode(model, prompt_len, padded):
    """Committed canvases encoded into the static cache (ring slots, device offsets) give the
    decoder the states the KVCache path gives after model.encode of the same canvases: three
    commits, so the sliding layers' ring (window - 1 = 7 slots, canvases of 16) wraps."""
    torch.manual_seed(100 + prompt_len)
    tc, C, B, n = model.tc, model.cfg.canvas_length, 2, 3
    mask, cache = encoded_prompt(model, B, prompt_len, padded)
    step = denoise_step.DenoiseStep(model, B, denoise_step.capacity_bucket(prompt_len + n * C), 4, 1, model.device)
    step.start(seed=1, bound=0.1, confidence=0.005, t_min=0.4, t_max=0.8)
    dmask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool)], 1) if padded else None
    step.start_canvas(0, cache, dmask)
    for i in range(n):
        committed = torch.randint(0, tc.vocab_size, (B, C))
        model.encode(committed, cache, dmask)
        step.commit(committed)
        mask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool)], 1)
        dmask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool)], 1) if padded else None
        canvas = torch.randint(0, tc.vocab_size, (B, C))
        want = model.denoise(canvas, cache, mask=dmask)
        got = model.denoise(canvas, step.cache)
        assert torch.equal(step.cache.canvas_pos, cache.canvas_positions(C, model.device))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert step.cache.length == cache.length == prompt_len + n * C


def test_commit_past_the_static_slots_is_refused(model):
    """A full layer's slots are the capacity bucket: a commit that would overflow them raises
    (before any device work) instead of wrapping over the prompt's keys."""
    tc, C = model.tc, model.cfg.canvas_length
    cache = KVCache.empty(tc.num_hidden_layers)
    model.encode(torch.randint(5, tc.vocab_size, (1, 250)), cache, None)
    step = denoise_step.DenoiseStep(model, 1, 256, 4, 1, model.device)
    step.start(seed=1, bound=0.1, confidence=0.005, t_min=0.4, t_max=0.8)
    step.start_canvas(0, cache, None)
    with pytest.raises(RuntimeError, match="266 keys do not fit the full layers' 256 static slots"):
        step.commit(torch.zeros(1, C, dtype=torch.long))


def test_rows_bucket():
    """A CPU computes exactly the rows left; CUDA the next power of two, at most the batch."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [denoise_step.rows_bucket(a, 8, cpu) for a in (1, 3, 5, 8)] == [1, 3, 5, 8]
    assert [denoise_step.rows_bucket(a, 8, cuda) for a in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert denoise_step.rows_bucket(5, 6, cuda) == 6


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """Damped layers and a peaked embedding: confident logits, so the stop test fires, at different
    steps in different rows, and a last-bit difference in a sum cannot flip a token."""
    from dgplug.testing import make_checkpoint

    return dgplug.load(make_checkpoint(tmp_path_factory.mktemp("peaked") / "ckpt", peaked=2.0, damp=0.02), dtype="fp32")


def five_rows(model):
    """Five prompts and settings under which, on the peaked model, rows settle at different steps
    over 3 canvases and row 0 ends with EOS (289) in the first."""
    ids = torch.randint(5, 500, (5, 7), generator=torch.Generator().manual_seed(5))
    return ids, dict(max_new_tokens=3 * model.cfg.canvas_length, max_denoising_steps=20, seed=3, eos_token_id=[289])


def test_settled_rows_leave_the_batch(peaked, monkeypatch):
    """Rows frozen by the stop test and rows finished by EOS are no longer computed: the decoder's
    batch is the rows left, the rows frozen in a canvas come back for the next one, a finished row
    never does; tokens, forwards, steps and what on_step sees (in the caller's row order) are
    those of the run that computes every row (DGPLUG_COMPACT=0)."""
    m = peaked
    ids, kw = five_rows(m)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[3, :2] = False  # a left-padded row: its validity moves with its slot
    ids[3, :2] = 0
    runs = {}
    for compact in ("1", "0"):
        monkeypatch.setenv("DGPLUG_COMPACT", compact)
        batches, seen = [], []
        denoise = m.denoise
        monkeypatch.setattr(m, "denoise", lambda canvas, *a, **k: (batches.append(canvas.shape[0]),
                                                                     denoise(canvas, *a, **k))[1])
        out = m.generate(ids, mask, **kw, on_step=lambda s: seen.append((s.draft, s.canvas, s.accepted, s.finished)))
        monkeypatch.undo()
        runs[compact] = out, batches, seen
    (a, batches, seen_a), (b, full, seen_b) = runs["1"], runs["0"]
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.forwards, b.forwards) and a.steps == b.steps
    assert len(seen_a) == len(seen_b) and all(torch.equal(x, y) for s, t in zip(seen_a, seen_b) for x, y in zip(s, t))
    assert set(full) == {5} and sum(batches) == int(a.forwards.sum()) < sum(full)  # a row-forward each, no more
    first = batches[:a.steps[0]]
    assert first[0] == 5 and min(first) < 5  # rows left the batch within the first canvas ...
    assert batches[a.steps[0]] > min(first)  # ... and the frozen ones came back for the second
    assert int(a.forwards[0]) == 2 and (a.sequences[0, 7:] == 289).any()  # row 0 ended with EOS in canvas 0
    assert max(batches[a.steps[0]:]) == 4  # and was never computed again


STATE = ("canvas", "argmax", "accepted", "frozen", "forwards", "lock", "entropy", "sc_soft")


@pytest.mark.parametrize("confidence", [0.0, 1e9])
def test_steps_on_the_rows_left_equal_steps_on_all(model, monkeypatch, confidence):
    """Rows 0 and 2 of 4 settled after a first step: later steps over rows 1 and 3 alone (moved to
    slots 0 and 1 with their cache rows, left-padding validity, draft history and RNG keys) give
    those rows what steps over all four give (DGPLUG_COMPACT=0), and the settled rows keep their
    state. Then a committed canvas with row 3 finished: rows 0-2 come back (their committed
    tokens and cache rows to the right slots), row 3 stays out, and the next canvas's steps agree
    again. confidence 1e9: the stop test freezes a row as soon as its draft repeats (the history
    decides): row 3, locked whole, at the second step."""
    tc, C, B = model.tc, model.cfg.canvas_length, 4
    mask, cache = encoded_prompt(model, B, 9, padded=True)  # row 1 left-padded
    dmask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool)], 1)
    lock = torch.zeros(B, C, dtype=torch.bool)
    lock[3] = True
    committed = torch.randint(0, tc.vocab_size, (B, C), generator=torch.Generator().manual_seed(2))
    seen = {}
    for compact in ("0", "1"):
        monkeypatch.setenv("DGPLUG_COMPACT", compact)
        step = denoise_step.DenoiseStep(model, B, 256, 8, 1, model.device)
        step.start(seed=11, bound=1.0, confidence=confidence, t_min=0.4, t_max=0.8)
        step.start_canvas(0, cache, dmask, lock=lock)
        step.run()
        step.frozen[[0, 2]] = True
        step.settle(2)
        assert (step.n, step.order.tolist()) == ((2, [1, 3, 0, 2]) if compact == "1" else (4, [0, 1, 2, 3]))
        for _ in range(3):
            step.run()
        seen[compact] = [{k: step.ordered(getattr(step, k)) for k in STATE}]
        step.commit(committed, torch.tensor([False, False, False, True]))
        assert step.n == (3 if compact == "1" else 4)
        step.start_canvas(1, None, None)
        for _ in range(2):
            step.run()
        seen[compact].append({k: step.ordered(getattr(step, k)) for k in STATE})
    for full, part in zip(seen["0"], seen["1"]):
        for k in STATE[:-2]:
            assert torch.equal(part[k], full[k]), k
        for k in STATE[-2:]:
            torch.testing.assert_close(part[k], full[k], rtol=1e-5, atol=1e-5)
    assert seen["0"][0]["forwards"].tolist() == ([1, 4, 1, 4] if confidence == 0.0 else [1, 4, 1, 2])
    assert seen["0"][1]["forwards"].tolist() == ([3, 6, 3, 4] if confidence == 0.0 else [3, 6, 3, 2])


class _StandInGraph:
    """A stand-in for a captured CUDA graph: capture records the pass and the batch size it was
    captured at (and runs nothing, as capture does not); a replay must find that batch size."""

    replays: list = []

    def __init__(self, fn, pool):
        self.fn, self.step = fn, fn.__self__
        self.n = self.step.n

    def replay(self):
        assert self.step.n == self.n, f"a graph captured at batch {self.n} replayed at {self.step.n}"
        self.replays.append((self.fn.__name__, self.n))
        self.fn()


def test_graphs_per_batch_size_with_rows_rounded_up(peaked, monkeypatch):
    """What a GPU runs, with a stand-in for capture: batches rounded up to a power of two (settled
    rows inside the computed slots), one graph per pass and batch size, warmed up, captured, and
    replayed only at its batch size; tokens, forwards and steps are those of an eager run that
    computes every row."""
    m = peaked
    ids, kw = five_rows(m)
    monkeypatch.setenv("DGPLUG_COMPACT", "0")
    want = m.generate(ids, **kw)
    monkeypatch.setenv("DGPLUG_COMPACT", "1")
    on_cuda = denoise_step.rows_bucket
    monkeypatch.setattr(denoise_step, "rows_bucket", lambda alive, batch, device: on_cuda(alive, batch, torch.device("cuda")))
    monkeypatch.setattr(denoise_step, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(denoise_step, "_warm_up", lambda fn: fn())
    monkeypatch.setattr(denoise_step, "_capture", _StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    m.__dict__.pop("_denoise_steps", None)
    _StandInGraph.replays = []
    for _ in range(2):  # the second call replays the first's graphs
        got = m.generate(ids, **kw)
        assert torch.equal(got.sequences, want.sequences) and torch.equal(got.forwards, want.forwards)
        assert got.steps == want.steps
    step = next(iter(m._denoise_steps.values()))
    assert {"step", "step:2", "step:4", "commit:4"} <= set(step.graphs)
    assert all(g is not None for g in step.graphs.values())
    assert {n for _, n in _StandInGraph.replays} >= {2, 4, 5}


def test_rows_finished_without_a_pad_id_get_eos_canvases(peaked, monkeypatch):
    """No pad id: a row that ended in an earlier canvas is no longer computed, and its later
    canvases are EOS (not its starting noise)."""
    from dgplug import generation

    m, C = peaked, peaked.cfg.canvas_length
    ids, kw = five_rows(m)
    monkeypatch.setattr(generation, "special_token_id", lambda defaults, key: None)
    out = m.generate(ids, **kw)
    assert (out.sequences[0, 7:7 + C] == 289).any() and bool((out.sequences[0, 7 + C:] == 289).all())
    assert not (out.sequences[1:, 7:] == 289).all(-1).any()


def test_compaction_switch_is_read_once_per_call(peaked, monkeypatch):
    """DGPLUG_COMPACT turned off in the middle of a call (here by an on_step hook, after rows left
    the batch) changes nothing until the next call: the rows frozen in that canvas still come back."""
    m = peaked
    ids, kw = five_rows(m)
    monkeypatch.setenv("DGPLUG_COMPACT", "1")
    want = m.generate(ids, **kw)
    got = m.generate(ids, **kw, on_step=lambda s: s.step == 3 and monkeypatch.setenv("DGPLUG_COMPACT", "0"))
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.forwards, want.forwards)
