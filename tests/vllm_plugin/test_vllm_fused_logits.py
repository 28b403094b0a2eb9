"""compute_logits and the fused sampler: a step planned for dgplug's fused head + sampler builds no
[rows, vocab] logits; every other step (and a plan that turns out wrong) gets the real logits.

Real vLLM objects, built on CPU: dgplug's DiffusionGemmaModelState subclass (vLLM's canvas state,
its real ``prepare_inputs``), vLLM's ``RequestState`` and ``Sampler`` (their SamplingStates /
LogprobTokenIdsState hold the per-request logprobs and top-k), the DGPlugDiffusionSampler that
``custom_sampler`` builds on them, ``SamplingParams``, ``NewRequestData`` and an ``InputBatch``
made by vLLM's ``InputBatch.make_dummy`` with the decode fields set (each request: one canvas of
draft tokens, canvas_length logit rows). Not real: the hidden states (random [rows, H]; the
engine forward needs vLLM's GPU attention backend), and in the sampler tests the parent
``DiffusionSampler.__call__`` / ``_fused_call`` are spies (vLLM's sample step is torch.compiled
with inductor, too slow for these 2-core CPU tests); they record what they were handed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vllm_helpers import build_and_load


def _build_parts(ckpt, state_cls=None):
    """A model, dgplug's ModelState (``state_cls``, default the model's own) and the sampler its
    custom_sampler builds, on vLLM's real RequestState / Sampler / InputBuffers."""
    from vllm import SamplingParams
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu import buffer_utils
    from vllm.v1.worker.gpu.input_batch import InputBuffers
    from vllm.v1.worker.gpu.sample.sampler import Sampler
    from vllm.v1.worker.gpu.states import RequestState

    model, vc = build_and_load(ckpt)
    cpu = torch.device("cpu")
    max_reqs = vc.scheduler_config.max_num_seqs
    max_tokens = vc.scheduler_config.max_num_batched_tokens
    V = model.tc.vocab_size
    with set_current_vllm_config(vc), pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available():
            # vLLM's CPU platform reports UVA but cannot pin memory: take its own non-UVA buffers.
            mp.setattr(buffer_utils, "is_uva_available", lambda: False)
        state = (state_cls or model.get_model_state_cls())(vc, model, None, cpu)
        req_states = RequestState(max_num_reqs=max_reqs, max_model_len=vc.model_config.max_model_len,
                                  max_num_batched_tokens=max_tokens, num_speculative_steps=model.canvas_length,
                                  vocab_size=V, device=cpu)
        base = Sampler(vllm_config=vc, max_num_reqs=max_reqs, vocab_size=V, device=cpu, req_states=req_states)
        sampler, rejection = state.custom_sampler(base)
        buffers = InputBuffers(max_reqs, max_tokens, cpu)
    assert rejection is None and type(sampler).__name__ == "DGPlugDiffusionSampler"
    assert state.dgplug_sampler is sampler
    return {"model": model, "vc": vc, "state": state, "sampler": sampler, "req_states": req_states,
            "buffers": buffers, "SamplingParams": SamplingParams}


@pytest.fixture(scope="module")
def parts(vllm_dist, vllm_diffusion_gemma):
    return _build_parts(vllm_dist["ckpt"])


def _add(p, slot, **sampling):
    """A request in `slot` (the runner's add_requests: ModelState and sampler, then staged writes)."""
    from vllm.v1.core.sched.output import NewRequestData

    sp = p["SamplingParams"](temperature=1.0, max_tokens=32, **sampling)
    # prefill_token_ids: optional in vLLM 0.32/0.33, required from 0.34
    new = NewRequestData(req_id=f"req{slot}", prompt_token_ids=[5, 6, 7], mm_features=[], sampling_params=sp,
                         pooling_params=None, block_ids=([],), num_computed_tokens=0, lora_request=None,
                         prefill_token_ids=[5, 6, 7])
    p["state"].remove_request(new.req_id)
    p["state"].add_request(slot, new)
    p["sampler"].add_request(slot, sp)
    # the runner's sampler.apply_staged_writes(), less the logprob token ids' own ids: those are
    # written by a Triton kernel (no CPU backend); their count (all the fused plan reads) is copied
    p["sampler"].sampling_states.apply_staged_writes()
    p["sampler"].logprob_token_ids_state.num_token_ids.copy_to_uva()


def _decode_batch(p, slots, structured=False):
    """A denoise step: every request schedules its whole canvas (canvas_length draft tokens) and
    gets canvas_length logit rows, built on vLLM's InputBatch.make_dummy."""
    from vllm.v1.worker.gpu.input_batch import InputBatch

    W, n = p["model"].canvas_length, len(slots)
    b = InputBatch.make_dummy(n, n * W, p["buffers"])
    b.input_ids.copy_(torch.randint(0, p["model"].tc.vocab_size, (n * W,)))
    idx_np = np.asarray(slots, dtype=np.intp)
    cu = np.arange(n + 1, dtype=np.int32) * W
    return dataclasses.replace(
        b, req_ids=[f"req{s}" for s in slots], idx_mapping=torch.as_tensor(idx_np, dtype=torch.int64),
        idx_mapping_np=idx_np, num_draft_tokens=n * W, num_draft_tokens_per_req=np.full(n, W, dtype=np.int32),
        cu_num_logits_np=cu, cu_num_logits=torch.as_tensor(cu), logits_indices=torch.arange(n * W),
        has_structured_output_reqs=structured)


def _hidden(p, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, p["model"].tc.hidden_size, generator=g)


def _reference_logits(model, h):
    """What compute_logits returned before the fused plan existed: the LogitsProcessor over the
    tied head, softcapped, fp32 (and the same from first principles)."""
    from dgplug import ops

    ref = ops.softcap(model.logits_processor(model.lm_head, h), model.final_logit_softcapping)
    E = model.model.embed_tokens.weight[: model.tc.vocab_size].float()
    cap = model.final_logit_softcapping
    assert torch.allclose(ref, cap * torch.tanh(h.float() @ E.T / cap), atol=1e-5)
    return ref


def _largest_allocation(fn):
    """(result, largest single CPU allocation in bytes made while fn ran), from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    return out, max(sizes, default=0)


def _prepare(p, batch):
    from vllm.config import set_current_vllm_config

    with torch.no_grad(), set_current_vllm_config(p["vc"]):
        return p["state"].prepare_inputs(batch, p["req_states"])


def test_fused_step_returns_placeholder_without_vocab_allocation(parts):
    p, model = parts, parts["model"]
    for s in (0, 1):
        _add(p, s)
    batch = _decode_batch(p, [0, 1])
    out = _prepare(p, batch)
    assert "inputs_embeds" in out  # vLLM's own prepare_inputs ran (super first)
    rows, V = 2 * model.canvas_length, model.tc.vocab_size
    assert model.fused_step and model.fused_rows == rows
    h = _hidden(p, rows)
    with torch.no_grad():
        logits, biggest = _largest_allocation(lambda: model.compute_logits(h))
    assert logits.shape == (rows, V) and logits.dtype == torch.float32 and logits.device == h.device
    assert logits.untyped_storage().nbytes() <= 8 and logits.stride() == (0, 0)
    assert biggest < rows * V * 4 // 16, f"an allocation of {biggest} bytes (logits are {rows * V * 4})"
    assert model.sample_hidden is h and model.logits_placeholder is logits
    # the plan is used once: a second call this step (vLLM's prompt logprobs) gets real logits
    with torch.no_grad():
        again, biggest_real = _largest_allocation(lambda: model.compute_logits(h))
    assert again.untyped_storage().nbytes() == rows * V * 4 and biggest_real >= rows * V * 4  # the probe sees it
    assert torch.equal(again, _reference_logits(model, h))

    # the sampler routes the placeholder to the fused path with the kept hidden states
    seen = {}
    sampler = p["sampler"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(sampler), "_fused_call", lambda self, ib, hid, *a: seen.setdefault("hidden", hid))
        mp.setattr(vllm_dg(p).DiffusionSampler, "__call__", lambda *a, **k: pytest.fail("took vLLM's path"))
        _prepare(p, batch)
        ph = model.compute_logits(h)
        assert sampler(ph, batch) is h
    assert seen["hidden"] is h and model.sample_hidden is None and model.logits_placeholder is None


def test_row_count_mismatch_gets_real_logits(parts):
    p, model = parts, parts["model"]
    _add(p, 0)
    _prepare(p, _decode_batch(p, [0]))
    assert model.fused_step
    h = _hidden(p, model.canvas_length + 1)  # not the planned rows: never a placeholder
    with torch.no_grad():
        logits = model.compute_logits(h)
    assert logits.untyped_storage().nbytes() == h.shape[0] * model.tc.vocab_size * 4
    assert torch.equal(logits, _reference_logits(model, h))


def vllm_dg(p):
    import vllm.model_executor.models.diffusion_gemma as dg

    return dg


@pytest.mark.parametrize("case", ["logprobs", "logprob_token_ids", "top_k", "top_p", "structured", "env_off"])
def test_logits_needed_gets_real_logits(parts, case, monkeypatch):
    """One plain request beside one that needs the logits (or a structured-output batch, or the
    fused sampler switched off): the step is not planned fused and compute_logits returns the
    real logits, equal to what it returned before the plan existed."""
    p, model = parts, parts["model"]
    _add(p, 0)
    extra = {"logprobs": {"logprobs": 2}, "logprob_token_ids": {"logprob_token_ids": [3, 4]},
             "top_k": {"top_k": 5}, "top_p": {"top_p": 0.5}}.get(case, {})
    _add(p, 1, **extra)
    if case == "env_off":
        monkeypatch.setenv("DGPLUG_VLLM_FUSED_SAMPLER", "0")
    batch = _decode_batch(p, [0, 1], structured=case == "structured")
    _prepare(p, batch)
    assert not model.fused_step
    rows, V = 2 * model.canvas_length, model.tc.vocab_size
    h = _hidden(p, rows, seed=1)
    with torch.no_grad():
        logits = model.compute_logits(h)
    assert logits.untyped_storage().nbytes() == rows * V * 4 and logits.stride() == (V, 1)
    assert torch.equal(logits, _reference_logits(model, h))
    assert model.sample_hidden is None and model.logits_placeholder is None


@pytest.mark.parametrize("change", ["top_k_added", "logprobs_added", "env_off", "canvas_narrowed"])
def test_sampler_materialises_logits_when_plan_turns_wrong(parts, change, monkeypatch):
    """The step was planned fused (compute_logits returned the placeholder), then the batch stopped
    being eligible before the sampler ran: the sampler hands vLLM's DiffusionSampler the real
    logits built from the kept hidden states, never the placeholder."""
    p, model, sampler = parts, parts["model"], parts["sampler"]
    dg = vllm_dg(p)
    for s in (0, 1):
        _add(p, s)
    batch = _decode_batch(p, [0, 1])
    _prepare(p, batch)
    assert model.fused_step
    rows = 2 * model.canvas_length
    h = _hidden(p, rows, seed=2)
    with torch.no_grad():
        placeholder = model.compute_logits(h)
    assert placeholder.untyped_storage().nbytes() <= 8
    if change == "top_k_added":
        _add(p, 1, top_k=5)
    elif change == "logprobs_added":
        _add(p, 1, logprobs=1)
    elif change == "env_off":
        monkeypatch.setenv("DGPLUG_VLLM_FUSED_SAMPLER", "0")
    else:
        p["state"].diffusion_states.canvas_width_np[1] = model.canvas_length // 2
    handed = {}

    def parent_call(self, logits, input_batch, draft_logits=None):
        handed["logits"], handed["batch"] = logits, input_batch
        return "vllm-path"

    monkeypatch.setattr(dg.DiffusionSampler, "__call__", parent_call)
    monkeypatch.setattr(type(sampler), "_fused_call", lambda *a: pytest.fail("took the fused path"))
    try:
        with torch.no_grad():
            assert sampler(placeholder, batch) == "vllm-path"
    finally:
        p["state"].diffusion_states.canvas_width_np[1] = model.canvas_length
    got = handed["logits"]
    assert got is not placeholder and handed["batch"] is batch
    assert got.untyped_storage().nbytes() == rows * model.tc.vocab_size * 4
    assert torch.equal(got, _reference_logits(model, h))
    assert model.sample_hidden is None and model.logits_placeholder is None and not model.fused_step


def test_structured_batch_with_placeholder_is_refused(parts, monkeypatch):
    """A grammar bitmask the runner wrote into the placeholder could not be recovered: if a
    structured-output batch ever reaches the sampler with it, the sampler raises (never samples
    without the grammar)."""
    p, model, sampler = parts, parts["model"], parts["sampler"]
    for s in (0, 1):
        _add(p, s)
    batch = _decode_batch(p, [0, 1])
    _prepare(p, batch)
    with torch.no_grad():
        placeholder = model.compute_logits(_hidden(p, 2 * model.canvas_length))
    monkeypatch.setattr(vllm_dg(p).DiffusionSampler, "__call__", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(RuntimeError, match="structured-output"):
        sampler(placeholder, dataclasses.replace(batch, has_structured_output_reqs=True))


# ----------------------------------------------------------------------------------------------
# Later vLLM layouts (read from their sources, not installable here): what dgplug detects
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["0.32", "0.33"])
def test_top_k_top_p_query_of_either_shape(parts, layout, monkeypatch):
    """vLLM 0.33 gave SamplingStates.get_top_k_top_p a third argument (the vocabulary size) and a
    third result; 0.32 takes two and returns two. The fused plan asks vLLM's own decision in
    either shape: a plain pair of requests is planned fused, one with top_k is not."""
    p, model, sampler = parts, parts["model"], parts["sampler"]
    real = sampler.sampling_states.get_top_k_top_p
    seen = []
    if layout == "0.33":
        def query(expanded_idx_mapping, idx_mapping_np, vocab_size):
            seen.append(vocab_size)
            top_k, top_p = real(expanded_idx_mapping, idx_mapping_np)
            return top_k, top_p, False
    else:
        def query(expanded_idx_mapping, idx_mapping_np):
            seen.append(None)
            return real(expanded_idx_mapping, idx_mapping_np)
    monkeypatch.setattr(sampler.sampling_states, "get_top_k_top_p", query)
    for s in (0, 1):
        _add(p, s)
    batch = _decode_batch(p, [0, 1])
    _prepare(p, batch)
    assert model.fused_step and sampler.fused_eligible(batch)
    _add(p, 1, top_k=5)
    _prepare(p, batch)
    assert not model.fused_step and not sampler.fused_eligible(batch)
    assert seen and set(seen) == ({model.tc.vocab_size} if layout == "0.33" else {None})
    _add(p, 1)


def _vllm_034_layout(dg):
    """A stand-in for vLLM 0.34's diffusion_gemma module on this vLLM's real classes, changed as
    0.34 changed them (and nothing else): the DiffusionSampler takes a ``compute_logits`` callable
    and is handed the sampled hidden states, which the ModelState's ``compute_sample_logits`` passes
    through; ``__call__`` is the parent's (a spy in the tests)."""
    import types

    class DiffusionSampler(dg.DiffusionSampler):
        def __init__(self, *args, compute_logits, **kw):
            super().__init__(*args, **kw)
            self.compute_logits = compute_logits

    class DiffusionGemmaModelState(dg.DiffusionGemmaModelState):
        def compute_sample_logits(self, hidden_states):
            return hidden_states

    return types.SimpleNamespace(DiffusionSampler=DiffusionSampler, DiffusionGemmaModelState=DiffusionGemmaModelState,
                                 _denoise_temperature=dg._denoise_temperature,
                                 _compiled_sample_step=dg._compiled_sample_step)


@pytest.fixture(scope="module")
def parts_034(vllm_dist, vllm_diffusion_gemma):
    from dgplug.integrations import vllm_model

    layout = _vllm_034_layout(vllm_diffusion_gemma)
    p = _build_parts(vllm_dist["ckpt"], vllm_model.model_state_cls(layout))
    p["layout"] = layout
    return p


def test_sampler_layout_detected(vllm_diffusion_gemma):
    import types

    from dgplug.integrations import vllm_model

    dg = vllm_diffusion_gemma
    assert vllm_model.sampler_takes_hidden(dg) is False  # the installed vLLM (0.32): logits
    assert vllm_model.sampler_takes_hidden(_vllm_034_layout(dg)) is True
    # the real class (the installed vLLM's) is cached; a stand-in's is built apart
    assert vllm_model.model_state_cls() is vllm_model.model_state_cls()
    assert vllm_model.model_state_cls(_vllm_034_layout(dg)) is not vllm_model.model_state_cls()
    half = types.SimpleNamespace(DiffusionSampler=_vllm_034_layout(dg).DiffusionSampler,
                                 DiffusionGemmaModelState=dg.DiffusionGemmaModelState)
    with pytest.raises(RuntimeError, match="does not know this layout"):
        vllm_model.sampler_takes_hidden(half)


def test_hidden_states_sampler_plans_nothing_and_fuses(parts_034, monkeypatch):
    """0.34 layout: custom_sampler builds dgplug's sampler with the model's real logits as
    compute_logits; prepare_inputs plans no placeholder (compute_logits stays real), and an eligible
    batch's hidden states go straight to the fused path."""
    p, model, sampler = parts_034, parts_034["model"], parts_034["sampler"]
    assert sampler.takes_hidden and isinstance(sampler, p["layout"].DiffusionSampler)
    assert sampler.compute_logits == model.full_logits
    for s in (0, 1):
        _add(p, s)
    batch = _decode_batch(p, [0, 1])
    out = _prepare(p, batch)
    assert "inputs_embeds" in out and not model.fused_step and sampler.fused_eligible(batch)
    rows = 2 * model.canvas_length
    h = _hidden(p, rows, seed=3)
    with torch.no_grad():
        logits = model.compute_logits(h)  # never a placeholder on this layout
    assert logits.untyped_storage().nbytes() == rows * model.tc.vocab_size * 4
    assert torch.equal(logits, _reference_logits(model, h))
    seen = {}
    monkeypatch.setattr(type(sampler), "_fused_call", lambda self, ib, hid, *a: seen.setdefault("hidden", hid))
    monkeypatch.setattr(p["layout"].DiffusionSampler, "__call__", lambda *a, **k: pytest.fail("took vLLM's path"))
    assert sampler(h, batch) is h and seen["hidden"] is h


@pytest.mark.parametrize("case", ["top_k", "env_off", "rows"])
def test_hidden_states_sampler_hands_vllm_the_hidden_states(parts_034, case, monkeypatch):
    """0.34 layout, a batch that needs the logits (or hidden states of another row count): vLLM's
    path gets the hidden states themselves (it projects them with compute_logits = full_logits)."""
    p, model, sampler = parts_034, parts_034["model"], parts_034["sampler"]
    _add(p, 0)
    _add(p, 1, **({"top_k": 5} if case == "top_k" else {}))
    if case == "env_off":
        monkeypatch.setenv("DGPLUG_VLLM_FUSED_SAMPLER", "0")
    batch = _decode_batch(p, [0, 1])
    _prepare(p, batch)
    assert not model.fused_step
    rows = 2 * model.canvas_length + (1 if case == "rows" else 0)
    h = _hidden(p, rows, seed=4)
    handed = {}

    def parent_call(self, hidden_states, input_batch, draft_logits=None):
        handed["hidden"], handed["batch"] = hidden_states, input_batch
        return "vllm-path"

    monkeypatch.setattr(p["layout"].DiffusionSampler, "__call__", parent_call)
    monkeypatch.setattr(type(sampler), "_fused_call", lambda *a: pytest.fail("took the fused path"))
    assert sampler(h, batch) == "vllm-path"
    assert handed["hidden"] is h and handed["batch"] is batch
    assert model.sample_hidden is None and model.logits_placeholder is None
    _add(p, 1)
