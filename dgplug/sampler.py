"""The EntropyBound sampler, as released (spec section 5).

Each denoise step turns the decoder's output into: a sampled canvas y, the argmax canvas a,
per-position entropy H of the temperature-scaled distribution, and the next step's
self-conditioning input. Acceptance, re-noising and the stop test then run on those small
[B, L] results. Two ways to get them:

- `step_unfused` (rng="transformers"): full fp32 logits, torch softmax/multinomial/Categorical,
  in transformers' exact order of random draws, so a seeded run gives its very tokens.
- `step_fused` (the default): dgplug.kernels.sampler.head_sample walks the vocabulary in tiles
  from the hidden states; no [B, L, V] tensor; Gumbel-max on a counter-based generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def temperature(n: int, n_steps: int, t_min: float, t_max: float, device=None) -> torch.Tensor:
    """T = t_min + (t_max - t_min) * n / N, computed in fp32 tensor arithmetic like transformers."""
    cur = torch.tensor(n, dtype=torch.int32, device=device)
    return t_min + ((t_max - t_min) * (cur / n_steps))


def entropy(scaled_logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy in nats (torch.distributions.Categorical, as transformers)."""
    return torch.distributions.Categorical(logits=scaled_logits).entropy()


def accept(entropy_: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the longest low-entropy prefix with sum(H) - max(H) <= bound, per row. [B, L] bool."""
    sorted_h, order = torch.sort(entropy_, dim=-1, descending=False)
    keep = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.scatter(torch.zeros_like(keep), -1, order, keep)


class StopTest:
    """Stable (argmax unchanged for `stability` steps) and confident (mean entropy < threshold)."""

    def __init__(self, stability: int, confidence: float):
        self.stability, self.confidence = stability, confidence
        self.history = None

    def __call__(self, argmax: torch.Tensor, entropy_: torch.Tensor) -> torch.Tensor:
        if self.stability == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (entropy_.mean(dim=-1) < self.confidence)


@dataclass
class StepResult:
    sampled: torch.Tensor  # [B, L] long
    argmax: torch.Tensor  # [B, L] long
    entropy: torch.Tensor  # [B, L] fp32
    sc_logits: torch.Tensor | None = None  # next step's self-conditioning logits (unfused path)
    sc_soft: torch.Tensor | None = None  # next step's soft embedding, unscaled fp32 (fused path)


def step_unfused(logits: torch.Tensor, T: torch.Tensor, emb_dtype, processors=None, ids=None, n=None) -> StepResult:
    """Full-logits step in transformers' draw order: one multinomial over [B*L, V]."""
    scaled = logits
    if processors:  # called as transformers calls them: through a LogitsProcessorList, which hands
        # cur_step only to the processors that take it (TopKLogitsWarper and the like do not)
        from transformers import LogitsProcessorList

        if not isinstance(processors, LogitsProcessorList):
            processors = LogitsProcessorList(processors)
        scaled = processors(ids, scaled, cur_step=n)
    scaled = scaled / T
    B, L, V = scaled.shape
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, V), num_samples=1).view(B, L)
    del probs
    return StepResult(sampled, torch.argmax(scaled, dim=-1), entropy(scaled), sc_logits=scaled.to(emb_dtype))


def step_fused(hidden: torch.Tensor, embedding: torch.Tensor, T: torch.Tensor, softcap: float, seed: int, step: int) -> StepResult:
    """Head + sampler in one streaming pass over the vocabulary (dgplug.kernels.sampler)."""
    from dgplug.kernels.sampler import head_sample

    B, L, D = hidden.shape
    out = head_sample(hidden.reshape(B * L, D), embedding, softcap=softcap, temperature=float(T), seed=seed, step=step)
    return StepResult(out.token.view(B, L), out.argmax.view(B, L), out.entropy.view(B, L),
                      sc_soft=out.soft.view(B, L, D))
