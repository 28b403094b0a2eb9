"""Block-diffusion generation: canvases one after another, each denoised in parallel.

    encode(prompt)                                     # writes the cache
    for each canvas:
        x = random canvas; for n = N..1: denoise step   # EntropyBound (dgplug.sampler)
        commit the argmax canvas; pad after EOS; encode it causally
rng="counter" runs the steps and the commits' encoder passes on static buffers, as CUDA graphs on
a GPU (dgplug.denoise_step); the prompt's encoder pass runs eagerly (its length varies).
Batches are left-padded; a row that meets the stop test is frozen while others go on, and with
rng="counter" it leaves the batch (its slot is no longer computed) until the next canvas.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import denoise_step, threads
from . import sampler as sp
from .config import special_token_id
from .errors import InputError
from .model import KVCache


@dataclass
class StepInfo:
    """What the `on_step` hook sees after every denoise step."""

    canvas_index: int
    step: int  # 1-based step within this canvas
    draft: torch.Tensor  # [B, L] argmax canvas
    canvas: torch.Tensor  # [B, L] next input canvas (accepted tokens + fresh noise)
    accepted: torch.Tensor  # [B, L] bool (rng="counter": a settled row's are those of its last step)
    entropy: torch.Tensor  # [B, L]
    finished: torch.Tensor  # [B] bool, rows settled: frozen by the stop test, or ended (EOS) in an earlier canvas


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, prompt + k * canvas_length]
    tokens_per_forward: torch.Tensor  # [B] non-pad new tokens / decoder forwards
    forwards: torch.Tensor  # [B] decoder forwards used per row
    steps: list[int] = field(default_factory=list)  # denoise steps run per canvas


def _setting(value, defaults: dict, key: str):
    return defaults[key] if value is None or value is UNSET else value


# The default of the arguments that an explicit None turns off, as in transformers' generate (its
# kwargs override the generation config, None included): t_min / t_max (no temperature),
# stability_threshold / confidence_threshold (no stop test), eos_token_id, pad_token_id.
UNSET = object()


def _transformers_threads_for_transformers_rng(fn):
    """rng="transformers" promises transformers' tokens: its ops then run on transformers'
    thread count (threads.as_transformers), since fp32 sums depend on it."""

    @functools.wraps(fn)
    def run(*args, rng: str = "counter", **kwargs):
        if rng != "transformers":
            return fn(*args, rng=rng, **kwargs)
        with threads.as_transformers():
            return fn(*args, rng=rng, **kwargs)

    return run


def _check_inputs(input_ids, attention_mask, decoder_input_ids, locked, C: int) -> None:
    """One InputError naming the argument whose type or shape is wrong (not an IndexError later)."""
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask),
                    ("decoder_input_ids", decoder_input_ids), ("locked", locked)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must be [batch, length>0], got {list(input_ids.shape)}")
    B = input_ids.shape[0]
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}: "
                         f"one 0/1 per prompt token")
    if decoder_input_ids is not None and tuple(decoder_input_ids.shape) != (B, C):
        raise InputError(f"decoder_input_ids has shape {list(decoder_input_ids.shape)}: the first canvas is "
                         f"[batch, canvas_length] = {[B, C]}")
    if locked is not None:
        if decoder_input_ids is None:
            raise InputError("locked needs decoder_input_ids: it marks positions of that canvas to keep "
                             "(without one, the canvas is random noise)")
        if locked.shape != decoder_input_ids.shape:
            raise InputError(f"locked has shape {list(locked.shape)}, decoder_input_ids {list(decoder_input_ids.shape)}")


@_transformers_threads_for_transformers_rng
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int | None = None, max_length: int | None = None, max_denoising_steps: int | None = None,
             entropy_bound: float | None = None, t_min=UNSET, t_max=UNSET, stability_threshold=UNSET,
             confidence_threshold=UNSET, rng: str = "counter", seed: int | None = None,
             on_step: Callable[[StepInfo], None] | None = None, decoder_input_ids: torch.Tensor | None = None,
             locked: torch.Tensor | None = None, logits_processor=None, eos_token_id=UNSET,
             pad_token_id=UNSET) -> GenerateOutput:
    """Generate with the EntropyBound sampler; defaults come from the checkpoint's generation_config.json.

    rng="transformers": transformers' order of draws from torch's global generator (seed it with
    torch.manual_seed) and its full-logits sampler, so the tokens equal transformers' token for
    token. rng="counter" (default): the fused streaming head + sampler with Gumbel-max on a
    counter-based generator keyed by (seed, step, position, token); `seed=None` draws a seed from
    torch's global generator. decoder_input_ids: the first canvas to start from; locked [B, L]:
    positions of that canvas that are kept as they are and never re-noised (in-line editing).
    max_length (argument or generation config): the length at which rows end; it sets the number of
    new tokens where max_new_tokens is 256, as in transformers. Settings not given come from
    generation_config.json; as in transformers, an explicit None turns off the temperature (t_min or
    t_max), the stop test (stability_threshold or confidence_threshold), EOS or padding.
    """
    d = model.generation_defaults
    tc, C = model.tc, model.cfg.canvas_length
    max_new_tokens = _setting(max_new_tokens, d, "max_new_tokens")
    N = _setting(max_denoising_steps, d, "max_denoising_steps")
    bound = float(_setting(entropy_bound, d, "entropy_bound"))
    scaled = t_min is not None and t_max is not None
    t_min, t_max = (float(_setting(t_min, d, "t_min")), float(_setting(t_max, d, "t_max"))) if scaled else (1.0, 1.0)
    stops = stability_threshold is not None and confidence_threshold is not None
    stability = int(_setting(stability_threshold, d, "stability_threshold")) if stops else 0
    confidence = float(_setting(confidence_threshold, d, "confidence_threshold")) if stops else float("-inf")
    eos = eos_token_id if eos_token_id is not UNSET else special_token_id(d, "eos_token_id")
    pad = pad_token_id if pad_token_id is not UNSET else special_token_id(d, "pad_token_id")
    if rng not in ("counter", "transformers"):
        raise InputError(f"rng={rng!r}: use 'counter' or 'transformers'")
    _check_inputs(input_ids, attention_mask, decoder_input_ids, locked, C)
    max_length = max_length if max_length is not None else d.get("max_length")
    if max_length and max_new_tokens == 256:  # transformers' rule: max_length counts only against 256
        max_new_tokens = max_length - input_ids.shape[-1]
    if int(input_ids.max()) >= tc.vocab_size or int(input_ids.min()) < 0:
        raise InputError(f"input_ids hold ids outside the vocabulary [0, {tc.vocab_size})")
    if model.cfg.image_token_id is not None and bool((input_ids == model.cfg.image_token_id).any()):
        raise InputError("image tokens in input_ids: dgplug runs the text model only (see README: Images)")
    if not (N > 0 and max_new_tokens > 0 and (t_max > t_min >= 0 or not scaled)):
        raise InputError(f"bad sampler settings: steps={N}, max_new_tokens={max_new_tokens}, t_min={t_min}, t_max={t_max}")

    device = model.device
    ids = input_ids.to(device)
    B, L0 = ids.shape
    eos_t = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=device) if eos is not None else None
    mask = attention_mask.to(device).bool() if attention_mask is not None else None
    padded = mask is not None and not bool(mask.all())
    max_length = max_length or L0 + max_new_tokens  # rows end once the sequence is that long
    fused = rng == "counter" and logits_processor is None
    gen = None
    if rng == "counter":
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else int(seed)
        gen = torch.Generator(device=device).manual_seed(seed)

    cache = KVCache.empty(tc.num_hidden_layers)
    finished_seq = torch.zeros(B, dtype=torch.bool, device=device)
    forwards = torch.zeros(B, dtype=torch.int, device=device)
    n_canvases = math.ceil(max_new_tokens / C)
    stepper = None
    if fused:  # static buffers for the whole generation; a CUDA graph on the GPU
        stepper = denoise_step.for_generation(model, B, L0 + (n_canvases - 1) * C, N, stability)
        stepper.start(seed=seed, bound=bound, confidence=confidence, t_min=t_min, t_max=t_max)
    steps_used: list[int] = []
    for c in range(n_canvases):
        if stepper is not None and c > 0:  # the committed canvas into the static cache (a graph on CUDA)
            stepper.commit(ids[:, -C:], finished_seq)
        else:
            model.encode(ids if c == 0 else ids[:, -C:], cache, mask if padded else None)
        first = decoder_input_ids.to(device) if (c == 0 and decoder_input_ids is not None) else None
        lock = locked.to(device).bool() if (c == 0 and locked is not None) else None
        dmask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool, device=device)], 1) if padded else None
        if stepper is not None:
            stepper.start_canvas(c, cache if c == 0 else None, dmask, first, lock)
            steps = 0
            for _ in range(N):
                stepper.run()
                steps += 1
                if on_step is not None:
                    on_step(StepInfo(c, steps, *map(stepper.ordered, (stepper.argmax, stepper.canvas, stepper.accepted,
                                                                      stepper.entropy, stepper.frozen | stepper.finished))))
                alive = int(stepper.alive)  # the one host read of a step
                if alive == 0:
                    break
                if steps < N:  # after the last step, the commit regroups the rows anyway
                    stepper.settle(alive)  # settled rows leave the batch
            argmax = stepper.ordered(stepper.argmax)
            if pad is None and eos_t is not None and bool(finished_seq.any()):  # rows no longer computed:
                argmax[finished_seq] = eos_t[0]  # EOS, not their starting noise
        else:
            argmax, steps = _denoise_eager(model, ids, cache, dmask, first, lock, finished_seq, forwards, gen, N, bound,
                                           t_min, t_max, stability, confidence, logits_processor, rng, c, on_step)
        steps_used.append(steps)
        ids = torch.cat([ids, argmax], dim=-1)
        ids, finished_seq = _commit(ids, finished_seq, C, eos_t, pad, max_length)
        if bool(finished_seq.all()):
            break
        if padded:
            mask = torch.cat([mask, torch.ones(B, C, dtype=torch.bool, device=device)], 1)
    if stepper is not None:
        forwards = stepper.ordered(stepper.forwards)
    new = ids[:, L0:]
    valid = (new != pad).sum(-1) if pad is not None else torch.full((B,), new.shape[1], device=device)
    return GenerateOutput(ids, valid / forwards, forwards, steps_used)


def _denoise_eager(model, ids, cache, dmask, first, lock, finished_seq, forwards, gen, N, bound, t_min, t_max,
                   stability, confidence, logits_processor, rng, c, on_step):
    """One canvas step by step with full logits (rng="transformers", or logits processors):
    transformers' order of random draws. Returns (draft canvas, steps)."""
    B, C, V = ids.shape[0], model.cfg.canvas_length, model.tc.vocab_size
    device = ids.device
    noise = torch.randint(0, V, (B, C), device=device, generator=gen)  # drawn even when a canvas is given
    canvas = first if first is not None else noise
    argmax, sc_logits = canvas, None
    frozen = torch.zeros(B, dtype=torch.bool, device=device)
    stop = sp.StopTest(stability, confidence)
    steps = 0
    for n in range(N, 0, -1):
        forwards += (~(frozen | finished_seq)).int()
        T = sp.temperature(n, N, t_min, t_max, device)
        h = model.denoise(canvas, cache, sc_logits=sc_logits, mask=dmask)
        r = sp.step_unfused(model.head(h), T, model.embed_tokens.weight.dtype, logits_processor, ids, n)
        steps += 1
        renoise = torch.randint(0, V, (B, C), device=device, generator=gen)
        acc = sp.accept(r.entropy, bound)
        sampled = r.sampled
        if lock is not None:
            acc = acc | lock
            sampled = torch.where(lock, canvas, sampled)
        new_canvas = torch.where(acc, sampled, renoise)
        new_argmax = torch.where(lock, canvas, r.argmax) if lock is not None else r.argmax
        new_sc_logits = r.sc_logits
        if frozen.any():
            new_argmax = torch.where(frozen[:, None], argmax, new_argmax)
            new_canvas = torch.where(frozen[:, None], canvas, new_canvas)
            if sc_logits is not None:
                new_sc_logits = torch.where(frozen[:, None, None], sc_logits, new_sc_logits)
        frozen |= stop(new_argmax, r.entropy)
        canvas, argmax, sc_logits = new_canvas, new_argmax, new_sc_logits
        if on_step is not None:
            on_step(StepInfo(c, steps, argmax, canvas, acc, r.entropy, frozen | finished_seq))
        done = frozen if rng == "transformers" else (frozen | finished_seq)
        if bool(done.all()):
            break
    return argmax, steps


def _commit(ids, finished, C, eos_t, pad, max_length):
    """After a canvas: rows finished before become pad; in rows finishing now, pad after the first EOS."""
    new = ids[:, -C:]
    now = torch.zeros_like(finished) if eos_t is None else torch.isin(new, eos_t).any(-1)
    if ids.shape[1] >= max_length:
        now = torch.ones_like(finished)
    before, finished = finished, finished | now
    if pad is not None and bool(finished.any()):
        ids[before, -C:] = pad
        if eos_t is not None and bool(now.any()):
            is_eos = torch.isin(new, eos_t)
            cs = is_eos.cumsum(-1)
            new[(cs > 0) & ~((cs == 1) & is_eos)] = pad
    return ids, finished
