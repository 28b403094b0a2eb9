"""The checks of transformers' own DiffusionGemma tests (tests/models/diffusion_gemma: modeling and
generation), written again against dgplug's model and sampler, with transformers' classes as the
oracle, so that a transformers release that changes behaviour fails here:

- decoder masks (no padding, left padding, integer padding mask, prompt beyond the sliding window):
  the keys each dgplug decoder layer sees = transformers' diffusion decoder mask for that layer type;
- sampler rules: entropy-bound acceptance, re-noising, the linear temperature schedule, the
  stable-and-confident stop test, tokens per forward;
- generate with the options transformers tests (sampler, temperature and stopping settings, a
  generation config overridden by arguments, generation past the sliding window), token for token
  and tokens per forward equal to transformers' over several seeds.
What tests/test_parity.py checks already (default generate, left-padded logits, EOS, the stop test
firing) is not repeated here.
"""

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

import transformers

import dgplug
from dgplug import ops
from dgplug import sampler as sp
from dgplug.integrations.transformers_patch import _cache_kwarg
from dgplug.testing import make_checkpoint, tiny_text_config

# transformers 5.13 rewrote how a canvas's sliding-window mask is cut from the encoder cache
SLIDING_AS_5_13 = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 13)

WINDOW = 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("port") / "ckpt", text=tiny_text_config(sliding_window=WINDOW),
                           image_token_id=512)  # out of the vocabulary: see dgplug.testing.build_hf_model
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, experts_implementation="eager").eval()
    return hf, dgplug.load(path)


# -- decoder masks ----------------------------------------------------------------------------
def _dgplug_decoder_masks(dg, ids, am, canvas, dam):
    """{layer type: [B, canvas, keys] bool} as dgplug's decoder layers see them (one forward)."""
    seen, real = [], ops.attention

    def record(q, k, v, *, q_pos, k_pos, key_valid=None, causal=False, window=None):
        if not causal:  # the decoder's layers, in order
            vis = ops.attention_mask(q_pos, k_pos, key_valid, False, None, q.shape[0])
            vis = torch.ones(1, 1, 1, 1, dtype=torch.bool) if vis is None else vis
            seen.append(vis.expand(q.shape[0], 1, len(q_pos), len(k_pos))[:, 0])
        return real(q, k, v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid, causal=causal, window=window)

    ops.attention = record
    try:
        dg(input_ids=ids, attention_mask=am, decoder_input_ids=canvas, decoder_attention_mask=dam)
    finally:
        ops.attention = real
    out = {}
    for kind, vis in zip(dg.tc.layer_types, seen, strict=True):
        assert torch.equal(out.setdefault(kind, vis), vis)  # every layer of a kind sees the same keys
    return out


def _transformers_decoder_masks(hf, ids, am, canvas, dam):
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        hf.model.encoder(input_ids=ids, attention_mask=am, **{_cache_kwarg(hf.model.encoder): cache})
    masks = hf.model.decoder.create_diffusion_decoder_attention_mask(hf.config.text_config, canvas.unsqueeze(-1),
                                                                     cache, dam)
    B, C = canvas.shape
    out = {}
    for kind, m in masks.items():
        lk = min(cache.get_seq_length(), WINDOW - 1) + C if kind == "sliding_attention" else dam.shape[1]
        out[kind] = torch.ones(B, C, lk, dtype=torch.bool) if m is None else m[:, 0]
    return out


@pytest.mark.parametrize("prefill, pad, int_mask", [(6, 0, False), (6, 2, False), (6, 2, True), (16, 2, False)])
def test_decoder_masks(pair, prefill, pad, int_mask):
    """transformers' test_diffusion_decoder_mask_dynamic_cache{,_left_padding,_int_padding_mask,
    _beyond_sliding_window}: every canvas query sees every non-padded key; sliding layers keep the
    last window - 1 cached keys, so a short left padding leaves their view once the prompt passes
    the window."""
    hf, dg = pair
    C = dg.cfg.canvas_length
    g = torch.Generator().manual_seed(prefill + pad)
    ids = torch.randint(5, 500, (2, prefill), generator=g)
    canvas = torch.randint(5, 500, (2, C), generator=g)
    am = torch.ones(2, prefill, dtype=torch.long if int_mask else torch.bool)
    am[0, :pad] = 0
    dam = torch.cat([am, torch.ones(2, C, dtype=am.dtype)], 1)
    ours, theirs = _dgplug_decoder_masks(dg, ids, am, canvas, dam), _transformers_decoder_masks(hf, ids, am, canvas, dam)
    assert set(ours) == set(theirs) == {"sliding_attention", "full_attention"}
    for kind in theirs:
        assert torch.equal(ours[kind], theirs[kind]), kind
    full, sliding = ours["full_attention"], ours["sliding_attention"]
    assert full.shape == (2, C, prefill + C) and int(full.sum()) == (2 * (prefill + C) - pad) * C
    assert not bool(full[0, :, :pad].any())
    window_keys = min(prefill, WINDOW - 1) + C
    assert sliding.shape == (2, C, window_keys)
    hidden = max(0, pad - max(0, prefill - (WINDOW - 1)))  # padded positions still in the sliding cache
    assert int(sliding.sum()) == (2 * window_keys - hidden) * C


# -- sampler rules ----------------------------------------------------------------------------
def _hf_sampler(bound, V=1000, C=256):
    return EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), canvas_length=C, vocab_size=V,
                               max_denoising_steps=48)


def test_entropy_bound_acceptance():
    """test_eb_sampler_accept_canvas: positions of entropy 2.9e-3, 7.8e-2 and 7.8e-2 among flat
    ones; a bound of 1e-2 accepts the first two, 1e-1 one more (the first token past the bound is
    always accepted). dgplug's acceptance mask equals transformers' for both bounds."""
    logits = torch.zeros(1, 256, 1000)
    logits[0, 0, 0], logits[0, 1, 1], logits[0, 2, 2] = 18.0, 14.5, 14.5
    canvas, denoised = torch.zeros(1, 256, dtype=torch.long), torch.ones(1, 256, dtype=torch.long)
    counts = []
    for bound in (1e-2, 1e-1):
        ref = _hf_sampler(bound)
        ref.accept_canvas(canvas, denoised, logits, cur_step=None)
        ours = sp.accept(sp.entropy(logits), bound)
        assert torch.equal(ours, ref.accepted_token_mask)
        counts.append(int(ours.sum()))
    assert counts[1] == counts[0] + 1 and bool(ours[0, :3].all())


def test_renoising_keeps_the_accepted():
    """test_eb_sampler_renoise_canvas: 9 zero-entropy positions and the first one past the bound
    are accepted (kept; the rest is re-noised), as transformers' sampler accepts them."""
    logits = torch.zeros(1, 256, 1000)
    logits[0, :9, 0] = 1e6
    acc = sp.accept(sp.entropy(logits), 0.1)
    ref = _hf_sampler(0.1)
    ref.accept_canvas(torch.zeros(1, 256, dtype=torch.long), torch.ones(1, 256, dtype=torch.long), logits, None)
    assert torch.equal(acc, ref.accepted_token_mask) and int(acc.sum()) == 10 and bool(acc[0, :9].all())


def test_linear_temperature_schedule():
    """test_linear_temperature_schedule: t_max at step N, the mid value at N/2; and at every step
    dgplug's temperature scales logits exactly as transformers' logits processor does."""
    N, t_min, t_max = 48, 0.4, 0.8
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=N)
    scores = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(scores / sp.temperature(N, N, t_min, t_max), scores / t_max)
    assert torch.allclose(scores / sp.temperature(N // 2, N, t_min, t_max), scores / ((t_max + t_min) / 2))
    for n in range(1, N + 1):
        cur = torch.tensor(n, dtype=torch.int32)  # transformers passes the step as an int32 tensor
        assert torch.equal(scores / sp.temperature(n, N, t_min, t_max), proc(None, scores, cur_step=cur))


def _both_stops(stability, confidence):
    return sp.StopTest(stability, confidence), StableAndConfidentStoppingCriteria(stability, confidence)


def test_stop_test_confidence():
    """test_stable_and_confident_stopping_criteria_confidence (vocabulary 10000: max entropy 9.21)."""
    flat = torch.zeros(1, 10, 10000)
    medium, low = flat.clone(), flat.clone()
    medium[:, :, 0], low[:, :, 0] = 14.5, 18.0  # mean entropy 7.8e-2 and 2.9e-3
    expect = {1e-2: [False, False, True], 9.20: [False, True, True], 9.22: [True, True, True]}
    argmax = torch.zeros(1, 10, dtype=torch.long)
    for threshold, want in expect.items():
        for logits, w in zip((flat, medium, low), want):
            ours, theirs = _both_stops(0, threshold)
            got = ours(argmax, sp.entropy(logits))
            assert bool(got.all()) == w and torch.equal(got, theirs(argmax, logits))


def test_stop_test_stability():
    """test_stable_and_confident_stopping_criteria_stability: stable after `stability` repeats of
    the same argmax canvas, unstable again on a new one; step by step equal to transformers'."""
    logits = torch.zeros(1, 10, 10000)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 10000, (1, 10), generator=g), torch.randint(0, 10000, (1, 10), generator=g)
    expect = {1: [False, True, True, False], 2: [False, False, True, False]}
    ent = sp.entropy(logits)
    for stability, want in expect.items():
        ours, theirs = _both_stops(stability, 9.22)
        for canvas, w in zip((a, a, a, b), want):
            got = ours(canvas, ent)
            assert bool(got.all()) == w and torch.equal(got, theirs(canvas, logits))


def test_tokens_per_forward(pair):
    """test_tokens_per_forward{,_batched}: new non-pad tokens / decoder forwards per row, as
    transformers' own _compute_tokens_per_forward counts them from dgplug's output."""
    _, dg = pair
    C = dg.cfg.canvas_length
    ids = torch.randint(5, 500, (3, 6), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    first = dg.generate(ids, max_new_tokens=2 * C, max_denoising_steps=3, rng="transformers")
    eos = int(first.sequences[1, 6 + 3])  # a token of row 1's first canvas: that row stops early, pads follow
    torch.manual_seed(0)
    out = dg.generate(ids, max_new_tokens=2 * C, max_denoising_steps=3, rng="transformers", eos_token_id=[eos])
    want = DiffusionGemmaGenerationMixin._compute_tokens_per_forward(out.sequences, out.forwards, 6, 0)
    assert torch.equal(out.tokens_per_forward, want)
    assert bool((out.sequences[1, 6:] == 0).any()) and len(set(out.tokens_per_forward.tolist())) > 1


# -- generate, against transformers' -------------------------------------------------------------
GENERATE = {  # transformers' test_generate parameterisations (dgplug name, transformers name)
    "custom_sampler": ({"entropy_bound": 0.3}, {"sampler_config": EntropyBoundSamplerConfig(entropy_bound=0.3)}),
    "custom_temperature": ({"t_min": 0.1, "t_max": 0.2}, {"t_min": 0.1, "t_max": 0.2}),
    "custom_stopping": ({"stability_threshold": 0, "confidence_threshold": 1e-1},
                        {"stability_threshold": 0, "confidence_threshold": 1e-1}),
    "from_generation_config": ({}, {}),  # the checkpoint's generation_config.json: 16 new tokens, 8 steps
    "kwarg_overrides": ({"max_new_tokens": 32, "max_denoising_steps": 3}, {"max_new_tokens": 32, "max_denoising_steps": 3}),
}


@pytest.mark.parametrize("name", list(GENERATE))
def test_generate_options_token_for_token(pair, name):
    hf, dg = pair
    ours_kw, theirs_kw = GENERATE[name]
    base = {} if name in ("from_generation_config", "kwarg_overrides") else {"max_new_tokens": 32, "max_denoising_steps": 3}
    ids = torch.randint(5, 500, (3, 12), generator=torch.Generator().manual_seed(4))
    am = torch.ones(3, 12, dtype=torch.long)
    am[0, :5] = 0
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        a = hf.generate(input_ids=ids, attention_mask=am, **base, **theirs_kw)
        torch.manual_seed(seed)
        b = dg.generate(ids, am, rng="transformers", **base, **ours_kw)
        assert torch.equal(a.sequences, b.sequences), (name, seed)
        assert torch.equal(a.tokens_per_forward.float(), b.tokens_per_forward.float()), (name, seed)
        runs.append(b.sequences)
    want = 32 if (base or name == "kwarg_overrides") else 16
    assert runs[0].shape == (3, 12 + want) and not torch.equal(runs[0], runs[1])  # the seed decides


def test_generate_beyond_sliding_window(tmp_path_factory):
    """test_generate_beyond_sliding_window: a prompt shorter than the window, generation past it."""
    window = 24
    path = make_checkpoint(tmp_path_factory.mktemp("window") / "ckpt", text=tiny_text_config(sliding_window=window),
                           image_token_id=512)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, experts_implementation="eager").eval()
    dg = dgplug.load(path)
    ids = torch.randint(5, 500, (2, 20), generator=torch.Generator().manual_seed(6))
    for seed in (0, 1):
        torch.manual_seed(seed)
        a = hf.generate(input_ids=ids, max_new_tokens=32, max_denoising_steps=2)
        torch.manual_seed(seed)
        b = dg.generate(ids, max_new_tokens=32, max_denoising_steps=2, rng="transformers")
        assert b.sequences.shape[1] == 52 > window
        if not SLIDING_AS_5_13:
            # 5.11 and 5.12 cut a canvas's sliding-window mask from the encoder cache by another path
            # (rewritten in 5.13): the same positions (the logits below agree to fp32 rounding), other
            # rounding, enough to flip one multinomial draw of the second canvas at one seed in four.
            # Tokens are compared on 5.13+; here the first canvas (against a cache of 20 < 24) must agree.
            assert torch.equal(a.sequences[:, :36], b.sequences[:, :36])
            continue
        assert torch.equal(a.sequences, b.sequences)
        assert torch.equal(a.tokens_per_forward.float(), b.tokens_per_forward.float())
    # every version: a canvas against a cache past the window (36 > 24) gives transformers' logits
    g = torch.Generator().manual_seed(7)
    prompt, canvas = torch.randint(5, 500, (2, 36), generator=g), torch.randint(0, 512, (2, 16), generator=g)
    with torch.no_grad():
        diff = (hf(input_ids=prompt, decoder_input_ids=canvas).logits
                - dg(input_ids=prompt, decoder_input_ids=canvas).logits).abs().max().item()
    assert diff < 1e-5
