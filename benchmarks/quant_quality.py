"""Quality and size of the quantized formats (issue 4): a markdown table.

For each scheme, on a small random DiffusionGemma with the real per-layer structure (5 sliding
layers then a full one, dense MLP beside a routed MoE, self-conditioning, tied embedding; tiny
widths; q/k norms at 0.25 so the model is not chaotic, spec section 8), saved in bf16:

* convert with `quantize_checkpoint` (the real converter), read back with `load_quantized_tensors`,
  dequantise into a transformers `DiffusionGemmaForBlockDiffusion` (fp32 compute), and compare its
  next-step token distribution with the bf16 checkpoint's (same fp32 compute), over a fixed set of
  prompts and two canvases each: step 1 (random canvas, no self-conditioning) and step 2 (half the
  canvas replaced by the reference's step-1 argmax, self-conditioning on the reference's step-1 logits);
* report the weight bytes of the tiny model (text tensors), the projected size of the released
  26B checkpoint (from the shapes of dgplug.names; vision tower excluded), mean KL(bf16 || quant)
  in nats per position, and argmax agreement.

Run: `.venv/bin/python benchmarks/quant_quality.py` (2 CPU-minutes; 2-6 minutes wall on 2 shared cores).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgplug.config import TextConfig  # noqa: E402
from dgplug.converters import quant as Q  # noqa: E402
from dgplug.names import is_vision, text_tensors  # noqa: E402
from dgplug.testing import make_checkpoint, tiny_text_config  # noqa: E402

RELEASED = TextConfig(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, sliding_window=1024,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(30)],
)


def gguf_projected_bytes(quant: str, imatrix: bool = False) -> tuple[int, float]:
    """(bytes, bits per weight) of the released text weights as a GGUF of file type `quant` (made with
    an imatrix or not: IQ4_XS's mix depends on it): the recipe's per-tensor types
    (converters.gguf_export.tensor_types) on the release's shapes."""
    from gguf import GGML_QUANT_SIZES

    from dgplug.converters.gguf_export import tensor_types

    total = params = 0
    for s, t in tensor_types(RELEASED, quant, imatrix):
        bs, ts = GGML_QUANT_SIZES[t]
        total += math.prod(s.shape) // bs * ts
        params += math.prod(s.shape)
    return total, 8 * total / params


def projected_bytes(scheme: str | None, group_size: int = 128, quantize_embedding: bool = False) -> int:
    """Bytes of the released text weights (bf16 source) under a scheme, from shapes alone."""
    total = 0
    for s in text_tensors(RELEASED):
        n = math.prod(s.shape)
        K = s.shape[-1]
        rows = n // K
        if scheme is None or s.kind not in ("linear", "experts", "embed"):
            total += 2 * n
        elif s.kind == "embed":
            total += (n + 4 * rows) if quantize_embedding else 2 * n
        elif scheme == "int4":
            total += n // 2 + 3 * rows * -(-K // group_size)  # short last group when g does not divide K
        else:
            total += n + 4 * rows
    return total


def tiny_text() -> dict:
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(6)]
    return tiny_text_config(
        vocab_size=1024, hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
        num_experts=16, top_k_experts=4, sliding_window=16, layer_types=layer_types,
    )


def load_model(src: Path):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(src), dtype=torch.float32).eval()


def set_weights(model, tensors: dict) -> None:
    """Copy (dequantised) checkpoint tensors into the model by name (encoder text weights are tied)."""
    with torch.no_grad():
        for name, v in tensors.items():
            if isinstance(v, dict):
                v = Q.dequantize(v)
            try:
                p = model.get_parameter(name)
            except AttributeError:
                p = model.get_buffer(name)
            p.copy_(v.to(p.dtype))


def inputs(vocab: int, canvas: int, n_prompts: int = 8, prompt_len: int = 24, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(5, vocab - 3, (n_prompts, prompt_len), generator=g)
    canvases = torch.randint(5, vocab - 3, (n_prompts, canvas), generator=g)
    half = torch.rand(n_prompts, canvas, generator=g) < 0.5
    return prompts, canvases, half


@torch.no_grad()
def logits_two_steps(model, prompts, canvases, half, ref_step1=None):
    out1 = model(input_ids=prompts, decoder_input_ids=canvases).logits.float()
    r1 = out1 if ref_step1 is None else ref_step1
    canvas2 = torch.where(half, r1.argmax(-1), canvases)
    out2 = model(input_ids=prompts, decoder_input_ids=canvas2, self_conditioning_logits=r1).logits.float()
    return out1, out2


def compare(ref, got):
    kl, agree, n = 0.0, 0.0, 0
    for a, b in zip(ref, got):
        lp, lq = a.log_softmax(-1), b.log_softmax(-1)
        kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
        agree += float((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0] * a.shape[1]
    return kl / n, agree / n


def resident_bytes(d: Path) -> int | None:
    """Bytes held by the model transformers loads from `d` (packed weights stay packed)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgplug.integrations.hf_quantizer import packed_bytes, register

    if not register():
        return None
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(d))
    packed, other = packed_bytes(m)
    return packed + other


def text_bytes(d: Path) -> int:
    """Bytes of the stored text weights (every tensor but the vision tower's), from the headers."""
    from dgplug.checkpoint import read_index

    return sum(t.nbytes for name, t in read_index(d).items() if not is_vision(name))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peaked", type=float, default=None, help="multiply the embedding (sharper logits)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_checkpoint(tmp / "bf16", text=tiny_text(), dtype=torch.bfloat16, qk_norm_scale=0.25,
                              canvas_length=32, peaked=args.peaked)
        model = load_model(src)
        V = model.config.text_config.vocab_size
        prompts, canvases, half = inputs(V, 32)
        ref = logits_two_steps(model, prompts, canvases, half)
        base = text_bytes(src)
        rows = [("bf16 (reference)", base, projected_bytes(None), 0.0, 1.0, resident_bytes(src))]
        variants = [
            ("int8", "int8", {}),
            ("fp8 e4m3", "fp8", {}),
            ("int4 asym g128 (default)", "int4", {}),
            ("int4 asym g128 + clip search", "int4", {"clip": True}),
            ("int4 asym g64", "int4", {"group_size": 64}),
            ("int8 + int8 embedding", "int8", {"quantize_embedding": True}),
            ("fp8 + int8 embedding", "fp8", {"quantize_embedding": True}),
            ("int4 g128 + int8 embedding", "int4", {"quantize_embedding": True}),
        ]
        for label, scheme, kw in variants:
            out = Q.quantize_checkpoint(src, tmp / label.replace(" ", "_"), scheme, progress=False, **kw)
            set_weights(model, Q.load_quantized_tensors(out, as_quantized_weight=False))
            got = logits_two_steps(model, prompts, canvases, half, ref_step1=ref[0])
            kl, ag = compare(ref, got)
            proj = projected_bytes(scheme, kw.get("group_size", 128), kw.get("quantize_embedding", False))
            res = None if kw.get("quantize_embedding") else resident_bytes(out)
            rows.append((label, text_bytes(out), proj, kl, ag, res))
        # symmetric int4 for comparison (not a converter option): same path, tensors quantized in memory
        from safetensors.torch import load_file

        sd = {}
        for f in sorted(src.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        from dgplug.config import load_config

        specs = {s.hf: s for s in text_tensors(load_config(src).text)}
        for mode in ("sym", "sym8"):
            deq = {}
            for k, v in sd.items():
                if k in specs and specs[k].kind in ("linear", "experts"):
                    deq[k] = Q.dequantize_int4(*Q.quantize_int4(v, 128, mode))
                else:
                    deq[k] = v
            set_weights(model, deq)
            kl, ag = compare(ref, logits_two_steps(model, prompts, canvases, half, ref_step1=ref[0]))
            label = "int4 sym absmax/7 g128" if mode == "sym" else "int4 sym Q4_0-style (max->-8) g128"
            rows.append((label, rows[3][1], projected_bytes("int4"), kl, ag, None))
    lines = [
        f"Tiny DiffusionGemma ({tiny_text()['num_hidden_layers']} layers, hidden 256, 16 experts top-4, vocab 1024, "
        f"canvas 32), bf16 checkpoint, {prompts.shape[0]} prompts x 2 canvas steps x 32 positions"
        + (f", embedding x{args.peaked}" if args.peaked else "") + ".",
        "",
        "| format | text weight bytes (tiny) | resident bytes, transformers load (tiny) | projected 26B release "
        "(text, GB) | mean KL vs bf16 (nats) | argmax agreement |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, b, proj, kl, ag, res in rows:
        r = f"{res:,}" if res else "n/a"
        lines.append(f"| {label} | {b:,} | {r} | {proj / 1e9:.2f} | {kl:.2e} | {ag * 100:.2f}% |")
    lines.append("")
    lines.append("Resident bytes: parameters and buffers of the model that `from_pretrained` builds (weights kept "
                 "packed by dgplug/integrations/hf_quantizer.py; tied tensors counted once; includes the tiny vision "
                 "tower). n/a: not loadable by transformers (int8 embedding) or not a converter option.")
    lines.append("")
    lines.append(f"({time.time() - t0:.0f} s)")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
