"""`dgplug generate`: options checked before loading, a loading line, a progress line (or the
live canvas), the output cut to exactly --max-new-tokens, and a summary line.

The model generates whole canvases (as transformers' DiffusionGemma does); the CLI keeps the
first --max-new-tokens of them and says so on stderr when it rounds. Text goes to stdout,
everything else to stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass

from rich.text import Text

from .common import CLIError, STATE, LiveView, at_least, err, note, out, print_text, say, steps_arg
from .paths import model_arg

RNGS = ("counter", "transformers")
DTYPES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")


@dataclass
class Options:
    path: object
    prompt: str | None = None
    ids: str | None = None
    max_new_tokens: int | None = None
    steps: int | None = None
    seed: int = 0
    rng: str = "counter"
    dtype: str | None = None
    chat: bool = True
    live: bool = False
    edit: str | None = None
    threads: int | None = None
    device: str | None = None
    as_json: bool = False


def read_stdin(o: Options) -> None:
    """A prompt or edit text given as "-" is read from standard input (one of the two)."""
    if o.prompt == "-" and o.edit == "-":
        raise CLIError("the prompt and --edit cannot both be read from standard input (-): give one as text")
    for field in ("prompt", "edit"):
        if getattr(o, field) == "-":
            if sys.stdin is None or sys.stdin.isatty():
                raise CLIError(f"{'the prompt' if field == 'prompt' else '--edit'} is -: pipe the text in "
                               f"(dgplug generate PATH - < file.txt)")
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
            try:
                setattr(o, field, data.decode("utf-8-sig").rstrip("\r\n"))  # a BOM and the last line end dropped
            except UnicodeDecodeError as e:
                raise CLIError(f"standard input is not UTF-8 text ({e.reason} at byte {e.start})") from None


def check(o: Options) -> None:
    """Everything that can be refused without the model."""
    if o.prompt is not None and o.ids is not None:
        raise CLIError("give a prompt (TEXT or --prompt TEXT) or --ids 1,2,3, not both")
    if o.prompt is None and o.ids is None and o.edit is None:
        piped = sys.stdin is not None and not sys.stdin.isatty()  # `cat q.txt | dgplug generate PATH`
        raise CLIError("give a prompt (PATH \"TEXT\" or --prompt TEXT) or --ids 1,2,3 (or --edit TEXT)"
                       + ("; standard input is read when the prompt is - (dgplug generate PATH - < file.txt)"
                          if piped else ""))
    if o.prompt is not None and not o.prompt.strip():
        raise CLIError("the prompt is empty: give some text (or --ids 1,2,3)")
    for name, text in (("the prompt", o.prompt), ("--edit", o.edit)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that are not UTF-8, passed through by the shell's locale
            byte = ord(text[e.start]) - 0xDC00  # the shell's undecodable byte, escaped as a surrogate
            raise CLIError(f"{name} is not UTF-8 text (byte 0x{byte:02x} at character {e.start})") from None
    if o.edit is not None and not o.edit.strip():
        raise CLIError("the --edit text is empty: give the text to edit, with [[spans]] to rewrite")
    if o.edit is not None and o.max_new_tokens is not None:
        raise CLIError("--max-new-tokens does not apply to --edit (the edit text fixes the length)")
    at_least("--max-new-tokens", o.max_new_tokens)
    steps_arg(o.steps)
    if o.rng not in RNGS:
        raise CLIError(f"--rng {o.rng!r}: use counter or transformers")
    if o.dtype is not None and o.dtype not in DTYPES:
        raise CLIError(f"--dtype {o.dtype!r}: use fp32, bf16 or fp16")
    if o.ids is not None:
        try:
            parsed = [int(x) for x in o.ids.split(",") if x.strip()]
        except ValueError:
            raise CLIError(f"--ids {o.ids!r}: expected comma-separated integers") from None
        if not parsed:
            raise CLIError(f"--ids {o.ids!r}: no token ids")
    if o.edit is not None:
        from dgplug.editing import parse_edit

        segments = parse_edit(o.edit)  # a malformed edit text fails before the model loads
        if all(kind == "keep" for kind, _ in segments):
            raise CLIError("--edit: nothing to rewrite: mark the words to rewrite as [[words]], or insert N new "
                           "tokens with [[+N]]")
        for kind, body in segments:
            if kind == "rewrite" and body.strip().startswith("+"):
                note(f"[[{body}]] rewrites the text {body.strip()!r}; to insert N new tokens write [[+N]] "
                     f"(e.g. [[+3]])")


def check_length(prompt: int, n: int, C: int, context: int) -> None:
    """Whole canvases after the prompt must fit the model's context (max_position_embeddings)."""
    canvases = -(-n // C)  # in integers: a float quotient misstates a huge --max-new-tokens
    if prompt + canvases * C > context:
        raise CLIError(f"--max-new-tokens {n}: the prompt's {prompt} tokens + {canvases} canvas(es) of {C} "
                       f"need {prompt + canvases * C} positions; the model's context is {context} "
                       f"(max_position_embeddings)")


def check_against_config(path, o: Options) -> None:
    """What the config alone can refuse (config.json or GGUF metadata, no weights): --ids outside the
    vocabulary, --max-new-tokens past the context (a --prompt counts as at least one token here;
    its exact length is checked again after tokenizing)."""
    from .info import config_of

    cfg = config_of(path)
    if cfg is None:
        return
    if o.edit is not None:  # the kept text's length is known once tokenized; the insertions' now
        from dgplug.editing import parse_edit

        inserted = sum(n for kind, n in parse_edit(o.edit) if kind == "insert")
        if inserted + 1 > cfg.canvas_length:
            raise CLIError(f"--edit: its [[+N]] insertions add {inserted} tokens; the canvas holds "
                           f"{cfg.canvas_length} with its EOS")
        return
    ids = [int(x) for x in o.ids.split(",") if x.strip()] if o.ids is not None else None
    bad = [i for i in ids or [] if not 0 <= i < cfg.text.vocab_size]
    if bad:
        raise CLIError(f"--ids: token id {bad[0]} is outside the vocabulary [0, {cfg.text.vocab_size})")
    if o.max_new_tokens is not None:
        check_length(len(ids) if ids else 1, o.max_new_tokens, cfg.canvas_length, cfg.text.max_position_embeddings)


def prompt_ids(model, o: Options):
    import torch

    if o.ids is not None:
        ids = torch.tensor([[int(x) for x in o.ids.split(",") if x.strip()]])
        V = model.tc.vocab_size
        bad = [int(i) for i in ids[0] if not 0 <= int(i) < V]
        if bad:
            raise CLIError(f"--ids: token id {bad[0]} is outside the vocabulary [0, {V})")
        return ids
    if o.prompt is None:  # an edit without an instruction: a lone BOS
        bos = model.generation_defaults.get("bos_token_id", model.tc.bos_token_id)
        return torch.tensor([[bos if bos is not None else 0]])
    tok = model.tokenizer
    if tok is None:
        raise CLIError(f"{model.source} has no tokenizer: use --ids")
    if o.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": o.prompt}], add_generation_prompt=True,
                                      tokenize=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(o.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise CLIError(f"the prompt {o.prompt!r} gives no tokens with this model's tokenizer")
    note_unknown(tok, ids[0].tolist(), "prompt tokens", "the model does not see that text")
    if ids.shape[1] > 1 and tok.bos_token_id is not None and ids[0, 0] == ids[0, 1] == tok.bos_token_id:
        note(f"the prompt starts with {tok.bos_token} twice: the tokenizer adds one, so leave it out of the text")
    return ids


def note_unknown(tok, ids: list[int], what: str, consequence: str) -> None:
    """A note when some of `ids` are the tokenizer's <unk>: e.g. free text given to a model with a
    small vocabulary (the model sees only <unk>)."""
    unk = getattr(tok, "unk_token_id", None)
    unknown = sum(int(i) == unk for i in ids) if unk is not None else 0
    if unknown:
        note(f"{unknown} of {len(ids)} {what} are unknown to this model's tokenizer ({tok.unk_token}): {consequence}")


def decode(model, ids: list[int]) -> str:
    tok = model.tokenizer
    if tok is None:
        return " ".join(str(int(i)) for i in ids)
    return tok.decode(ids, skip_special_tokens=True)


class Watch:
    """The on_step hook: a progress line (canvas k of n, step, tokens/s) or, with --live, the
    draft canvas detokenised as a whole. On a terminal both redraw in place on stderr and vanish
    at the end; otherwise they degrade to plain lines (progress: one per canvas; live: one per step)."""

    def __init__(self, model, canvases: int, steps: int, live: bool):
        self.model, self.canvases, self.steps, self.live = model, canvases, steps, live
        self.C = model.cfg.canvas_length
        self.t0 = time.perf_counter()
        self.canvas = 0
        self.last_step = 0
        self.view = None
        if err.is_terminal and not STATE["quiet"]:
            self.view = LiveView(12)

    def rate(self, tokens: int) -> float:
        return tokens / max(time.perf_counter() - self.t0, 1e-9)

    def __call__(self, s) -> None:
        if s.canvas_index != self.canvas:
            self._canvas_done()
            self.canvas = s.canvas_index
        self.last_step = s.step
        if STATE["quiet"]:
            return
        head = f"canvas {s.canvas_index + 1} of {self.canvases}, step {s.step} of {self.steps}"
        if self.live:
            acc = int(s.accepted[0].sum())
            text = decode(self.model, s.draft[0].tolist())
            if self.view is not None:
                self.view.update(Text(f"{head}, {acc}/{self.C} accepted\n", style="cyan") + Text(text))
            else:
                err.print(Text(f"{head}: ") + Text(text.replace("\n", " ")))
        elif self.view is not None:
            done = self.canvas * self.C
            speed = f"{self.rate(done):.1f} tokens/s" if done else f"{time.perf_counter() - self.t0:.1f}s"
            self.view.update(Text(f"{head}, {speed}", style="cyan"))

    def _canvas_done(self) -> None:
        if self.view is None and not self.live and not STATE["quiet"]:
            done = (self.canvas + 1) * self.C
            err.print(f"canvas {self.canvas + 1} of {self.canvases}: {self.last_step} steps, "
                      f"{self.rate(done):.1f} tokens/s")

    def close(self, finished: bool) -> None:
        if self.view is not None:
            self.view.stop()
        elif finished:
            self._canvas_done()


def run(o: Options) -> None:
    from . import common

    check(o)
    if o.live and STATE["quiet"]:
        note("--live shows nothing with --quiet (only the result is printed)")
    user_threads = common.threads_arg(o.threads)
    path = model_arg(str(o.path))
    device = common.device_arg(o.device)
    common.set_threads(user_threads)

    import torch

    from dgplug import load

    from .info import architecture

    torch.manual_seed(o.seed)
    check_against_config(path, o)  # lengths and ids refused before the weights are read
    say(f"loading {path}")
    t0 = time.perf_counter()
    model = load(path, dtype=o.dtype, device=device)
    threads = common.set_threads(user_threads, architecture(model.cfg)["params_total"])
    say(f"loaded in {time.perf_counter() - t0:.1f}s ({model.tc.num_hidden_layers} layers, "
        f"{str(model.embed_tokens.weight.dtype).replace('torch.', '')}, {device or 'cpu'}, "
        f"{threads} thread{'s' if threads > 1 else ''})")
    ids = prompt_ids(model, o)
    C = model.cfg.canvas_length
    N = o.steps or int(model.generation_defaults["max_denoising_steps"])
    if o.edit is not None:
        return _edit(model, ids, o, N, threads)
    n = o.max_new_tokens or int(model.generation_defaults.get("max_new_tokens") or C)
    canvases = math.ceil(n / C)
    check_length(int(ids.shape[1]), n, C, model.tc.max_position_embeddings)
    watch = Watch(model, canvases, N, o.live)
    t0 = time.perf_counter()
    res = None
    try:
        res = model.generate(ids, max_new_tokens=n, max_denoising_steps=o.steps, rng=o.rng, seed=o.seed,
                             on_step=watch)
    finally:
        watch.close(finished=res is not None)  # no progress line for a run that failed
    dt = time.perf_counter() - t0
    pad = model.generation_defaults.get("pad_token_id", model.tc.pad_token_id)
    new = res.sequences[0, ids.shape[1]:].tolist()
    generated = sum(1 for t in new if t != pad)
    kept = new[:n]
    while kept and kept[-1] == pad:  # the padding after EOS
        kept.pop()
    if len(new) > n and generated > n:
        note(f"the canvas is {C} tokens: generated {len(new)}, printing the first {n} (--max-new-tokens {n})")
    text = decode(model, kept)
    summary = dict(prompt_tokens=int(ids.shape[1]), new_tokens=len(kept), generated_tokens=generated,
                   max_new_tokens=n, canvas_length=C, canvases=len(res.steps), seconds=round(dt, 4),
                   tokens_per_second=round(generated / dt, 2), tokens_per_forward=round(float(res.tokens_per_forward[0]), 3),
                   steps=list(res.steps), threads=threads, device=device or "cpu")
    if o.as_json:
        out.print(json.dumps(dict(text=text, ids=kept, **summary)))
        return
    print_text(text)
    say(f"{generated} tokens in {dt:.2f}s = {generated / dt:.1f} tokens/s; {summary['tokens_per_forward']:.2f} "
        f"tokens per forward; steps per canvas {list(res.steps)}; {threads} thread{'s' if threads > 1 else ''}",
        style="dim")


def _edit(model, prompt_ids, o: Options, N: int, threads: int) -> None:
    watch = Watch(model, 1, N, o.live)
    t0 = time.perf_counter()
    res = None
    try:
        res = model.edit(prompt_ids, text=o.edit, max_denoising_steps=o.steps, rng=o.rng, seed=o.seed, on_step=watch)
    finally:
        watch.close(finished=res is not None)  # no progress line for an edit that failed
    dt = time.perf_counter() - t0
    if model.tokenizer is not None:  # kept words the tokenizer does not know come back as <unk>
        note_unknown(model.tokenizer, [i for i, k in zip(res.ids, res.locked) if k], "kept tokens of the edit",
                     "they are kept as that token")
    text = res.text if res.text is not None else " ".join(map(str, res.ids))
    n_free = sum(not k for k in res.locked)
    if o.as_json:
        out.print(json.dumps(dict(text=text, ids=list(res.ids), rewritten=n_free, seconds=round(dt, 4),
                                  steps=list(res.output.steps), threads=threads)))
        return
    print_text(text)
    say(f"{n_free} of {len(res.ids)} tokens rewritten in {dt:.2f}s; steps {res.output.steps}", style="dim")
