"""Train the embedded Sudoku DiffusionGemma on CPU with transformers' own modules.

    python examples/sudoku/train.py --out runs/sudoku2 --minutes 58   # the shipped model: this run,
    python examples/sudoku/train.py --out runs/sudoku3 --init runs/sudoku2/best --seed 1 --warmup 50 --lr 1e-3 --minutes 25
                                                                     # then this continuation
    python examples/sudoku/train.py --bench                      # steps/s for the chosen size

Objective (DiffusionGemma's): per example t ~ U(1e-3, 1); every canvas position is replaced by
a uniform random token (over the whole vocabulary) with probability t; cross-entropy on the
clean canvas. Self-conditioning with probability 0.5 (per batch): a first pass without grad,
then the trained pass fed its detached logits (the model turns them into softmax(logits) @ E).
Plus the encoder's next-token loss on the prompt (weight --enc-weight). One addition for the
Sudoku use: in 70% of the examples the givens (and <eos>) are never noised, which is what the
canvas looks like when givens are placed on it and locked at inference.

The learning rate follows a cosine over whichever limit comes first (steps or wall clock, since
the CPU is shared and its speed varies); every step's lr is in log.jsonl. The run stops after --steps steps or --minutes of wall clock, whichever is first; it saves
`latest/` every --save-every minutes and `best/` (lowest loss on a fixed validation batch).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sudoku as S  # noqa: E402

GENERATION = {
    "max_new_tokens": S.CANVAS_LEN,
    "max_denoising_steps": 48,
    "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    "t_min": 0.6,
    "t_max": 1.0,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "eos_token_id": [S.EOS],
    "pad_token_id": S.PAD,  # no bos_token_id: transformers 5.11 rejects it in a generation config
}


def text_config(args) -> dict:
    n = args.layers
    types = ["full_attention" if (i % 2 == 1 or i == n - 1) else "sliding_attention" for i in range(n)]
    return dict(
        vocab_size=S.VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=n,
        num_attention_heads=args.heads, num_key_value_heads=args.kv, head_dim=args.head_dim,
        global_head_dim=args.head_dim, num_global_key_value_heads=args.global_kv, sliding_window=args.window,
        num_experts=args.experts, top_k_experts=args.top_k, moe_intermediate_size=args.moe_inter,
        max_position_embeddings=512, layer_types=types, pad_token_id=S.PAD, eos_token_id=S.EOS, bos_token_id=S.BOS,
    )


def build_model(args):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dgplug.testing import TINY_VISION

    cfg = DiffusionGemmaConfig(
        text_config=text_config(args),
        vision_config=dict(TINY_VISION), canvas_length=S.CANVAS_LEN,
        boi_token_id=S.BOI, eoi_token_id=S.EOI, image_token_id=S.IMAGE,
    )
    torch.manual_seed(args.seed)
    if args.init:  # continue from a saved checkpoint (weights only; a fresh optimizer and schedule)
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.init, dtype=torch.float32)
        return grow(model, args.grow) if args.grow else model
    return DiffusionGemmaForBlockDiffusion(cfg)


def grow(model, n: int):
    """Deepen a trained model to n layers without changing what it computes: layer i >= L is a copy of
    layer i mod L (its type too) with the gains of its two post-norms (attention output and the
    dense + experts sum) set to 0, so it adds nothing to the residual until training opens it.
    Encoder and decoder share these layers, so both grow."""
    from transformers import DiffusionGemmaForBlockDiffusion

    cfg = model.config
    tc = cfg.text_config
    old = tc.num_hidden_layers
    if n <= old:
        raise SystemExit(f"--grow {n}: the checkpoint already has {old} layers")
    tc.layer_types = [tc.layer_types[i % old] for i in range(n)]
    tc.num_hidden_layers = n
    new = DiffusionGemmaForBlockDiffusion(cfg).to(torch.float32)
    src = model.state_dict()
    sd = {}
    for k in new.state_dict():
        m = re.match(r"(.*\.layers\.)(\d+)(\..*)", k)
        if not m or "vision" in k:
            sd[k] = src[k]
            continue
        i = int(m.group(2))
        w = src[f"{m.group(1)}{i % old}{m.group(3)}"].clone()
        if i >= old and m.group(3) in (".post_attention_layernorm.weight", ".post_feedforward_layernorm.weight"):
            w.zero_()
        sd[k] = w
    new.load_state_dict(sd, strict=True)
    return new


def make_batch(gen: S.Generator, n: int, lo: int, hi: int, g: torch.Generator, keep_share: float = 0.7):
    puz, sol = gen.batch(n, lo, hi)
    prompt = torch.from_numpy(S.prompt_ids(puz))
    clean = torch.from_numpy(S.canvas_ids(sol))
    given = torch.from_numpy(np.concatenate([puz > 0, np.ones((n, 1), bool)], axis=1))
    t = torch.rand(n, 1, generator=g) * (1 - 1e-3) + 1e-3
    noise_mask = torch.rand(clean.shape, generator=g) < t
    keep_givens = torch.rand(n, 1, generator=g) < keep_share
    noise_mask &= ~(given & keep_givens)
    noise = torch.randint(0, S.VOCAB_SIZE, clean.shape, generator=g)
    noisy = torch.where(noise_mask, noise, clean)
    return prompt, clean, noisy


def losses(model, prompt, clean, noisy, sc: bool, enc_weight: float):
    """(total, canvas CE, encoder next-token CE or 0, canvas argmax accuracy). enc_weight 0 skips that head."""
    sc_logits = None
    if sc:
        with torch.no_grad():
            sc_logits = model(input_ids=prompt, decoder_input_ids=noisy).logits.detach()
    out = model(input_ids=prompt, decoder_input_ids=noisy, self_conditioning_logits=sc_logits)
    logits = out.logits.float()
    canvas = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), clean.reshape(-1))
    enc_loss = torch.zeros((), device=canvas.device)
    if enc_weight:
        enc = out.encoder_last_hidden_state
        enc_logits = model.lm_head(enc[:, :-1]).float()
        cap = model.final_logit_softcapping
        enc_logits = torch.tanh(enc_logits / cap) * cap
        enc_loss = F.cross_entropy(enc_logits.reshape(-1, enc_logits.shape[-1]), prompt[:, 1:].reshape(-1))
    acc = (logits.argmax(-1) == clean).float().mean()
    return canvas + enc_weight * enc_loss, canvas, enc_loss, acc


def fix_config(path: Path):
    """Write global_head_dim into text_config explicitly: transformers drops it from per_layer_config
    when it equals head_dim, and dgplug's config reader then falls back to the release's 512."""
    f = path / "config.json"
    c = json.loads(f.read_text())
    tc = c["text_config"]
    tc.setdefault("global_head_dim", tc.get("per_layer_config", {}).get(
        str(tc["layer_types"].index("full_attention")), {}).get("head_dim", tc["head_dim"]))
    f.write_text(json.dumps(c, indent=2))


def save(model, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    fix_config(tmp)
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    S.save_tokenizer(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/sudoku")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast, fused AdamW)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--kv", type=int, default=2, help="KV heads on sliding layers")
    ap.add_argument("--global-kv", type=int, default=2, help="KV heads on full-attention layers")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-inter", type=int, default=32)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--givens", default="28,62", help="training givens range lo,hi (at the end of the run)")
    ap.add_argument("--givens-start", default=None, help="curriculum: range at the start, moved linearly to --givens")
    ap.add_argument("--keep-givens", type=float, default=0.7, help="share of examples whose givens are never noised")
    ap.add_argument("--enc-weight", type=float, default=0.1, help="encoder next-token loss weight (0: not computed)")
    ap.add_argument("--minutes", type=float, default=58.0, help="time limit (see --clock)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="what --minutes counts: wall clock, or this process's CPU time (fair on a shared CPU)")
    ap.add_argument("--save-every", type=float, default=8.0, help="minutes (same clock)")
    ap.add_argument("--snapshots", action="store_true", help="also keep every save as snap-MIN/ (learning curve)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--init", default=None, help="start from this checkpoint's weights (a continuation)")
    ap.add_argument("--grow", type=int, default=0, help="with --init: deepen to this many layers (see grow())")
    args = ap.parse_args()
    if args.grow and not args.init:
        ap.error("--grow N deepens a trained checkpoint: give it with --init")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch sees no CUDA device")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    end_lo, end_hi = (int(x) for x in args.givens.split(","))
    start_lo, start_hi = (int(x) for x in (args.givens_start or args.givens).split(","))

    model = build_model(args).to(dev).train()
    if cuda and hasattr(model, "set_experts_implementation"):
        # the per-expert loop: plain linears, which autocast runs in bf16 (grouped_mm would get fp32 master weights)
        model.set_experts_implementation("eager")
    n_text = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n and "lm_head" not in n)
    print(f"text params {n_text / 1e6:.2f}M", flush=True)
    params = [p for n, p in model.named_parameters() if "vision" not in n]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8, **({"fused": True} if cuda else {}))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def clock():  # seconds on the chosen clock since the start
        return (time.process_time() if args.clock == "cpu" else time.time()) - c0

    def progress(step):  # 0 -> 1 over whichever limit comes first (steps or time)
        return min(1.0, max((step - args.warmup) / max(1, args.steps - args.warmup), clock() / (args.minutes * 60)))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress(step))))

    def givens_at(step):
        p = progress(step)
        return round(start_lo + p * (end_lo - start_lo)), round(start_hi + p * (end_hi - start_hi))

    gen = S.Generator(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    vgen = S.Generator(10_000 + args.seed, pool=64)
    vg = torch.Generator().manual_seed(10_000 + args.seed)
    val = [tuple(x.to(dev) for x in make_batch(vgen, 64, 25, 45, vg))]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a")
    print(json.dumps(vars(args)), file=log, flush=True)
    c0 = time.process_time() if args.clock == "cpu" else time.time()
    t0 = time.time()
    last_save = 0.0
    best = float("inf")
    ema = None
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        lo, hi = givens_at(step)
        prompt, clean, noisy = (x.to(dev, non_blocking=True) for x in make_batch(gen, args.batch, lo, hi, g,
                                                                                  args.keep_givens))
        sc = bool(torch.rand(1, generator=g) < 0.5)
        with autocast:
            loss, canvas, enc_loss, acc = losses(model, prompt, clean, noisy, sc, args.enc_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0:
            canvas_v = canvas.item()
            ema = canvas_v if ema is None else 0.8 * ema + 0.2 * canvas_v
            rec = dict(step=step, min=round(clock() / 60, 2), wall=round((time.time() - t0) / 60, 2),
                       loss=round(canvas_v, 4), ema=round(ema, 4), enc=round(enc_loss.item(), 4),
                       acc=round(acc.item(), 4), lr=lr_at(step), givens=[lo, hi], sc=sc)
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n"), log.flush()
        if args.bench and step == 10:
            print(f"bench: {clock() / 11:.3f} s/step ({args.clock} clock, batch {args.batch})", flush=True)
            return
        stop = clock() > args.minutes * 60 or step == args.steps - 1
        if clock() - last_save > args.save_every * 60 or stop:
            model.eval()
            with torch.no_grad(), autocast:
                vl = []
                for vp, vc, vn in val:
                    r = model(input_ids=vp, decoder_input_ids=vn).logits.float()
                    vl.append(F.cross_entropy(r.reshape(-1, r.shape[-1]), vc.reshape(-1)).item())
                vloss = float(np.mean(vl))
            model.train()
            save(model, out / "latest")
            if args.snapshots:
                save(model, out / f"snap-{clock() / 60:05.1f}")
            if vloss < best:
                best = vloss
                save(model, out / "best")
            rec = dict(step=step, min=round(clock() / 60, 2), wall=round((time.time() - t0) / 60, 2),
                       val=round(vloss, 4), best=round(best, 4))
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n"), log.flush()
            last_save = clock()
        if stop:
            break
    print(f"done: {step + 1} steps in {clock() / 60:.1f} min ({args.clock}), {(time.time() - t0) / 60:.1f} min wall",
          flush=True)


if __name__ == "__main__":
    main()
