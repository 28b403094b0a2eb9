"""The `dgplug` command line (typer). Errors print one line; --debug shows the traceback."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DiffusionGemma, run with dgplug.")
console = Console()
STATE = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors.")):
    STATE["debug"] = debug


def run(fn):
    """Call fn; turn any error into one line unless --debug."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        raise typer.Exit(130)
    except Exception as e:  # noqa: BLE001 - the CLI's single error funnel
        if STATE["debug"]:
            raise
        msg = str(e) or e.__class__.__name__
        console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


# -- info ------------------------------------------------------------------------------------
def describe(path: Path) -> dict:
    from .checkpoint import SafetensorsCheckpoint, validate
    from .config import load_config
    from . import names

    cfg = load_config(path)
    ckpt = SafetensorsCheckpoint(path)
    specs = validate(ckpt, cfg)
    tc = cfg.text
    total = sum(_numel(s.shape) for s in specs if s.kind != "scalar")
    experts = sum(_numel(s.shape) for s in specs if s.kind == "experts")
    embed = sum(_numel(s.shape) for s in specs if s.kind == "embed")
    active = total - experts + experts * tc.top_k_experts // tc.num_experts
    files = list(path.glob("*.safetensors"))
    dtypes = sorted({str(ckpt.get(specs[0].hf).dtype).replace("torch.", "")})
    vision = sum(1 for k in ckpt.keys() if names.is_vision(k))
    pattern = "".join("S" if t == "sliding_attention" else "F" for t in tc.layer_types)
    return dict(cfg=cfg, total=total, active=active, experts=experts, embed=embed, dtype=dtypes[0],
                bytes=sum(f.stat().st_size for f in files), pattern=pattern, vision=vision)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _human(n: float, unit="") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.2f}P{unit}"


@app.command()
def info(path: Path = typer.Argument(..., help="Checkpoint directory.")):
    """Architecture, layer pattern, parameter counts (total / active), dtype and size."""

    def go():
        qc = _quantized(path)
        if qc is not None:
            _info_quantized(path, qc)
            return
        d = describe(path)
        tc = d["cfg"].text
        t = Table(show_header=False, box=None)
        t.add_row("architecture", f"DiffusionGemma ({tc.num_hidden_layers} layers, hidden {tc.hidden_size}, "
                                  f"vocab {tc.vocab_size}, canvas {d['cfg'].canvas_length})")
        t.add_row("layer pattern", f"{d['pattern']}  (S sliding window {tc.sliding_window}, F full)")
        t.add_row("attention", f"{tc.num_attention_heads} heads; sliding {tc.num_key_value_heads} kv x {tc.head_dim}; "
                               f"full {tc.num_global_key_value_heads} kv x {tc.global_head_dim} (K = V)")
        t.add_row("experts", f"{tc.num_experts} x {tc.moe_intermediate_size}, top-{tc.top_k_experts}; "
                             f"dense MLP {tc.intermediate_size}")
        t.add_row("parameters", f"{_human(d['total'])} total, {_human(d['active'])} active per token "
                                f"({_human(d['experts'])} in experts, {_human(d['embed'])} embedding)")
        t.add_row("vision tensors", f"{d['vision']} (skipped: dgplug runs the text model)")
        t.add_row("dtype / size", f"{d['dtype']} / {_human(d['bytes'], 'B')} on disk")
        console.print(t)

    run(go)


def _info_quantized(path: Path, qc: dict):
    """Scheme and bytes of a dgplug-quantized directory (packed weights vs everything else)."""
    from safetensors import safe_open

    packed = other = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = _numel(sl.get_shape()) * {"U8": 1, "I8": 1, "F8_E4M3": 1, "F16": 2, "BF16": 2, "F32": 4}.get(
                    sl.get_dtype(), 4)
                if k.endswith((".qweight", ".scale", ".zero")):
                    packed += n
                else:
                    other += n
    cfg = describe_config(path)
    t = Table(show_header=False, box=None)
    t.add_row("architecture", f"DiffusionGemma ({cfg.text.num_hidden_layers} layers, hidden {cfg.text.hidden_size})")
    t.add_row("quantization", f"{qc.get('scheme')} (dgplug), group size {qc.get('group_size')}, "
                              f"not converted: {', '.join(qc.get('modules_to_not_convert') or []) or '-'}")
    t.add_row("weight bytes", f"{_human(packed, 'B')} packed + {_human(other, 'B')} kept (norms, router, "
                              f"embedding, vision)")
    console.print(t)


def describe_config(path: Path):
    from .config import load_config

    return load_config(path)


def _quantized(path: Path):
    import json

    f = path / "config.json"
    if path.is_dir() and f.exists():
        try:
            return json.loads(f.read_text()).get("quantization_config")
        except json.JSONDecodeError:
            return None
    return None


# -- generate --------------------------------------------------------------------------------
def _prompt_ids(model, prompt: Optional[str], ids: Optional[str], chat: bool):
    import torch

    if ids:
        try:
            return torch.tensor([[int(x) for x in ids.split(",") if x.strip()]])
        except ValueError:
            raise typer.BadParameter(f"--ids {ids!r}: expected comma-separated integers") from None
    if prompt is None:
        raise typer.BadParameter("give --prompt TEXT or --ids 1,2,3")
    tok = model.tokenizer
    if tok is None:
        raise typer.BadParameter(f"{model.source} has no tokenizer: use --ids")
    if chat and getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tok(prompt, return_tensors="pt").input_ids


def _detok(model, ids) -> str:
    tok = model.tokenizer
    if tok is None:
        return " ".join(str(int(i)) for i in ids)
    return tok.decode(ids, skip_special_tokens=False)


def live_view(model, console: Console):
    """An on_step hook that redraws the canvas: accepted tokens bold, noise dim."""
    from rich.live import Live
    from rich.text import Text

    live = Live(console=console, refresh_per_second=20, transient=False)
    live.start()

    def on_step(s):
        tok = model.tokenizer
        text = Text(f"canvas {s.canvas_index + 1} step {s.step:>2}  ", style="cyan")
        for t, a in zip(s.draft[0].tolist(), s.accepted[0].tolist()):
            piece = tok.decode([t]) if tok is not None else f"{t} "
            text.append(piece if tok is not None else piece, style="bold green" if a else "dim")
        live.update(text)

    return live, on_step


@app.command()
def generate(
    path: Path = typer.Argument(..., help="Checkpoint directory (or .gguf file)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (uses the checkpoint's tokenizer)."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Prompt token ids, comma separated."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n"),
    steps: Optional[int] = typer.Option(None, "--steps", help="max denoising steps per canvas"),
    seed: int = typer.Option(0, "--seed"),
    rng: str = typer.Option("counter", "--rng", help="counter (fused, default) or transformers (bit-exact)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: checkpoint's)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="wrap the prompt in the chat template"),
    live: bool = typer.Option(False, "--live", help="show the canvas being denoised"),
    edit: Optional[str] = typer.Option(
        None, "--edit", help="in-line edit: TEXT with [[spans to rewrite]] and [[+N]] insertions of N tokens; "
                             "the rest stays locked on the canvas (the prompt, if any, is the instruction)"),
):
    """Generate text with the EntropyBound block-diffusion sampler (or edit a text in place)."""

    def go():
        import torch

        from . import load

        torch.manual_seed(seed)
        model = load(path, dtype=dtype)
        if edit is not None and prompt is None and ids is None:
            bos = model.generation_defaults.get("bos_token_id", model.tc.bos_token_id)
            prompt_ids = torch.tensor([[bos if bos is not None else 0]])
        else:
            prompt_ids = _prompt_ids(model, prompt, ids, chat)
        view, hook = live_view(model, console) if live else (None, None)
        t0 = time.perf_counter()
        try:
            if edit is not None:
                res = model.edit(prompt_ids, text=edit, max_denoising_steps=steps, rng=rng, seed=seed, on_step=hook)
                out = res.output
            else:
                out = model.generate(prompt_ids, max_new_tokens=max_new_tokens, max_denoising_steps=steps, rng=rng,
                                     seed=seed, on_step=hook)
        finally:
            if view is not None:
                view.stop()
        dt = time.perf_counter() - t0
        if edit is not None:
            console.print(res.text if res.text is not None else " ".join(map(str, res.ids)),
                          highlight=False, markup=False)
            n_free = sum(not k for k in res.locked)
            console.print(f"[dim]{n_free} of {len(res.ids)} tokens rewritten in {dt:.2f}s; "
                          f"steps {out.steps}[/dim]")
            return
        new = out.sequences[0, prompt_ids.shape[1]:]
        n_tok = int((new != model.generation_defaults.get("pad_token_id", 0)).sum())
        console.print(_detok(model, new.tolist()), highlight=False, markup=False)
        console.print(f"[dim]{n_tok} tokens in {dt:.2f}s = {n_tok / dt:.1f} tok/s; "
                      f"{float(out.tokens_per_forward[0]):.2f} tokens per forward; steps per canvas {out.steps}[/dim]")

    run(go)


# -- demo ------------------------------------------------------------------------------------
@app.command()
def demo(
    steps: Optional[int] = typer.Option(None, "--steps", help="max denoising steps (default: the checkpoint's)"),
    seed: int = typer.Option(0, "--seed"),
    live: bool = typer.Option(True, "--live/--no-live"),
    shown: int = typer.Option(2, "--puzzles", help="puzzles solved one by one (live when --live)"),
    sample: int = typer.Option(20, "--sample", help="held-out puzzles (36+ givens) for the solve rate"),
):
    """Run the embedded default model: Sudoku solved on the canvas (live), then solve rate and speed."""

    def go():
        import json

        import torch
        from rich.live import Live
        from rich.text import Text

        from . import load
        from .assets import default_model_path

        path = default_model_path()
        if not (path / "puzzles.json").exists():  # the tiny random fallback: plain generation
            model = load(path)
            prompt = torch.tensor([[2, 7, 8, 9, 10, 11]])
            out = model.generate(prompt, max_new_tokens=model.cfg.canvas_length, max_denoising_steps=steps or 16,
                                 seed=seed)
            console.print(f"[yellow]no Sudoku model shipped; tiny random default at {path}[/yellow]: "
                          f"{float(out.tokens_per_forward[0]):.2f} tokens per forward, denoising steps {out.steps}")
            return
        model = load(path, dtype="fp32")
        tok = model.tokenizer
        bank = json.loads((path / "puzzles.json").read_text())
        digit = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 10)]
        to_digit = {t: d + 1 for d, t in enumerate(digit)}
        eos = tok.eos_token_id

        def encode(puzzles):
            """Prompt ids (puzzle in the prompt), the canvas with the givens placed, and the lock mask."""
            texts = [tok.bos_token + " " + " ".join(f"r{i // 9 + 1}c{i % 9 + 1}={ch}" for i, ch in enumerate(p))
                     for p in puzzles]
            prompt = torch.tensor([tok.convert_tokens_to_ids(t.split()) for t in texts])
            g = torch.Generator().manual_seed(seed)
            canvas = torch.randint(0, model.tc.vocab_size, (len(puzzles), model.cfg.canvas_length), generator=g)
            lock = torch.zeros_like(canvas, dtype=torch.bool)
            for b, p in enumerate(puzzles):
                for i, ch in enumerate(p):
                    if ch != ".":
                        canvas[b, i], lock[b, i] = digit[int(ch) - 1], True
                canvas[b, 81], lock[b, 81] = eos, True
            return prompt, canvas, lock

        def solved(puzzle, ids):
            g = [to_digit.get(int(t), 0) for t in ids[:81]]
            if any(ch != "." and int(ch) != v for ch, v in zip(puzzle, g)):
                return False
            units = [[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)]
            units += [[(br + r) * 9 + bc + c for r in range(3) for c in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
            return all(sorted(g[i] for i in u) == list(range(1, 10)) for u in units)

        def render(puzzle, ids, accepted=None, title=""):
            text = Text(title + "\n", style="cyan")
            for r in range(9):
                if r and r % 3 == 0:
                    text.append("------+-------+------\n", style="dim")
                for c in range(9):
                    i = r * 9 + c
                    if c and c % 3 == 0:
                        text.append("| ", style="dim")
                    d = to_digit.get(int(ids[i]))
                    if puzzle[i] != ".":
                        text.append(puzzle[i] + " ", style="bold white")
                    elif d is None:
                        text.append("? ", style="red")
                    else:
                        text.append(f"{d} ", style="bold green" if accepted is None or accepted[i] else "dim")
                text.append("\n")
            return text

        gen_kw = dict(max_denoising_steps=steps, seed=seed)
        console.print(f"[cyan]embedded default model[/cyan] {path}: Sudoku DiffusionGemma "
                      f"({model.tc.num_hidden_layers} layers, hidden {model.tc.hidden_size}, "
                      f"{model.tc.num_experts} experts top-{model.tc.top_k_experts}, canvas {model.cfg.canvas_length}); "
                      f"givens placed on the canvas and locked, every other cell denoised in parallel")
        easy = [p for p in bank if p["givens"] >= 36]
        for k, item in enumerate(easy[:shown]):
            puzzle = item["puzzle"]
            prompt, canvas, lock = encode([puzzle])
            view, hook = None, None
            if live:
                view = Live(console=console, refresh_per_second=20, transient=False)
                view.start()

                def hook(s, puzzle=puzzle, view=view, k=k):
                    view.update(render(puzzle, s.draft[0].tolist(), s.accepted[0].tolist(),
                                       f"puzzle {k + 1} ({item['givens']} givens)  step {s.step:>2}"))
                    time.sleep(0.08)
            try:
                out = model.generate(prompt, decoder_input_ids=canvas, locked=lock, on_step=hook, **gen_kw)
            finally:
                if view is not None:
                    view.stop()
            ids = out.sequences[0, prompt.shape[1]:].tolist()
            ok = solved(puzzle, ids)
            if not live:
                console.print(render(puzzle, ids, title=f"puzzle {k + 1} ({item['givens']} givens)"))
            console.print(("[green]solved[/green]" if ok else "[red]not solved[/red]") +
                          f" in {out.steps[0]} denoising steps")

        batch = easy[:sample]
        prompt, canvas, lock = encode([p["puzzle"] for p in batch])
        t0 = time.perf_counter()
        out = model.generate(prompt, decoder_input_ids=canvas, locked=lock, **gen_kw)
        dt = time.perf_counter() - t0
        n_ok = sum(solved(p["puzzle"], out.sequences[b, prompt.shape[1]:].tolist()) for b, p in enumerate(batch))
        blanks = sum(p["puzzle"].count(".") for p in batch)
        forwards = int(out.forwards.sum())
        n_tok = int((out.sequences[:, prompt.shape[1]:] != model.generation_defaults.get("pad_token_id", 0)).sum())
        console.print(f"solve rate {n_ok}/{len(batch)} = {100 * n_ok / len(batch):.0f}% on held-out puzzles with "
                      f">= 36 givens (batch of {len(batch)})")
        console.print(f"{float(out.tokens_per_forward.float().mean()):.2f} tokens per forward "
                      f"({blanks / forwards:.2f} blank cells filled per forward); denoising steps used {out.steps[0]} "
                      f"(max {model.generation_defaults['max_denoising_steps'] if steps is None else steps}); "
                      f"{n_tok / dt:.0f} tokens/s ({blanks / dt:.0f} blank cells/s) on {torch.get_num_threads()} threads")

    run(go)


# -- convert / inspect -----------------------------------------------------------------------
@app.command()
def convert(
    src: Path = typer.Argument(..., help="Hugging Face DiffusionGemma directory."),
    out: Path = typer.Argument(..., help="OUT.gguf for GGUF types, a directory for int4/int8/fp8."),
    quant: str = typer.Option(..., "--quant", "-q",
                              help="F32 F16 BF16 Q8_0 Q4_0 Q4_K_M Q5_K_M Q6_K (GGUF) or int4 int8 fp8 (safetensors)"),
    group_size: int = typer.Option(128, "--group-size", help="int4 group size along the input dimension"),
):
    """Convert a checkpoint to GGUF (K-quants) or quantized safetensors, streaming."""

    def go():
        q = quant.strip()
        if q.lower() in ("int4", "int8", "fp8"):
            from dgplug.converters.quant import quantize_checkpoint

            quantize_checkpoint(src, out, q.lower(), group_size=group_size)
        else:
            from dgplug.converters.gguf_export import export_gguf

            export_gguf(src, out, quant=q.upper())
        console.print(f"wrote {out}")

    run(go)


@app.command()
def inspect(path: Path = typer.Argument(..., help="A .gguf file.")):
    """GGUF metadata, tensor table, and a check against the DiffusionGemma GGUF contract."""

    def go():
        from dgplug.converters.gguf_import import check_contract, inspect_table

        table = inspect_table(path)
        meta, rows = table["metadata"], table["tensors"]
        t = Table(title=str(path))
        for col in ("key", "value"):
            t.add_column(col)
        for k, v in meta.items():
            t.add_row(k, str(v)[:100])
        console.print(t)
        t = Table()
        for col in ("tensor", "type", "shape (ggml order)", "bytes"):
            t.add_column(col)
        for name, typ, shape, nbytes in rows:
            t.add_row(name, typ, str(list(shape)), _human(nbytes, "B"))
        console.print(t)
        problems = check_contract(path)
        if problems:
            for p in problems:
                console.print(f"[red]contract:[/red] {p}")
            raise typer.Exit(1)
        console.print("[green]matches the diffusion-gemma GGUF contract[/green]")

    run(go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
