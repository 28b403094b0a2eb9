"""`dgplug imatrix`: an importance matrix from dgplug's own forward over calibration text.

The model runs its real block-diffusion path (dgplug.converters.imatrix.collect: the encoder over
each prompt, the denoise steps over one canvas per prompt); the result is written in
llama.cpp's imatrix GGUF layout (or, with --output-format dat, its legacy layout, which older
llama.cpp builds and ik_llama.cpp read) under a temporary name and renamed when complete.
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import CLIError, note, out, say
from .paths import writable


def calibration_text(calib: str) -> tuple[str, list[str]]:
    """The text of FILE.txt, or of every *.txt in a directory (sorted, joined by blank lines);
    returns (text, dataset names as llama-imatrix records them)."""
    p = Path(calib)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise CLIError(f"--calib {calib}: a directory without .txt files")
    elif p.is_file():
        files = [p]
    else:
        raise CLIError(f"--calib {calib}: no such file or directory")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise CLIError(f"--calib {f}: not UTF-8 text") from None
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise CLIError(f"--calib {calib}: no text")
    return text, [f.name for f in files]


def output_format(o: str, fmt: str | None) -> str:
    """gguf unless --output-format says dat; as llama-imatrix, GGUF written to a name that does not
    end in .gguf gets a note (unless --output-format gguf was asked for)."""
    from dgplug.converters.imatrix import FORMATS

    if fmt is None:
        if not o.lower().endswith(".gguf"):
            note(f"writing {o} as an imatrix GGUF (its name does not end in .gguf); pass --output-format dat "
                 f"for llama.cpp's legacy layout")
        return "gguf"
    if fmt.lower() not in FORMATS:
        raise CLIError(f"--output-format {fmt}: one of {', '.join(FORMATS)}")
    return fmt.lower()


def output_path(o: str, overwrite: bool) -> Path:
    p = Path(o)
    if p.is_dir():
        raise CLIError(f"-o {o} is a directory: the imatrix is one file (e.g. {p / 'imatrix.gguf'})")
    if p.exists() and not overwrite:
        raise CLIError(f"{o} exists: pass --overwrite to replace it")
    if p.is_file():  # --overwrite replaces an earlier imatrix, never a model or the calibration text
        from dgplug.converters.imatrix import Imatrix

        try:
            Imatrix.load(p)
        except Exception:  # noqa: BLE001 - whatever it is, it is not an imatrix
            raise CLIError(f"-o {o} is not an imatrix: --overwrite replaces an earlier imatrix, not another "
                           f"file (a model, the calibration text?); choose another output") from None
    return writable(o, "-o")


def run(src: str, calib: str, o: str, chunk_size: int | None, chunks: int | None, batch: int, steps: int | None,
        seed: int, overwrite: bool, threads: int | None, device: str | None, quiet: bool,
        fmt: str | None = None) -> None:
    from . import common
    from .paths import model_arg

    for flag, value, what in (("--chunk-size", chunk_size, "a number of tokens"), ("--chunks", chunks, "a number"),
                              ("--batch", batch, "a number")):
        common.at_least(flag, value, what=what)
    common.steps_arg(steps)
    path = model_arg(src)
    text, datasets = calibration_text(calib)
    target = output_path(o, overwrite)
    fmt = output_format(o, fmt)
    user_threads = common.threads_arg(threads)
    device = common.device_arg(device)

    from dgplug import load
    from dgplug.converters.imatrix import calibration_chunks, collect

    from .info import architecture

    say(f"loading {src}")
    model = load(path, device=device)
    n = common.set_threads(user_threads, architecture(model.cfg)["params_total"])
    tok = model.tokenizer
    if tok is None:
        raise CLIError(f"{src} has no tokenizer: calibration text cannot be tokenized")
    ids = tok(text, add_special_tokens=False).input_ids
    from .generate import note_unknown

    note_unknown(tok, ids, "calibration tokens", "the statistics see that token, not the text")
    C = model.cfg.canvas_length
    if chunk_size is None:  # llama-imatrix's 512, or what the context holds beside one canvas (the Sudoku model: 430)
        chunk_size = max(1, min(512, model.tc.max_position_embeddings - C))
    parts = calibration_chunks(ids, chunk_size)
    available = len(parts)
    if chunks is not None:
        parts = parts[:chunks]
    if len(parts[0]) + C > model.tc.max_position_embeddings:
        raise CLIError(f"--chunk-size {chunk_size}: a prompt of {len(parts[0])} tokens + a canvas of {C} passes the "
                       f"model's context ({model.tc.max_position_embeddings})")
    cut = f" (--chunks {chunks} of {available})" if len(parts) < available else ""
    say(f"{len(ids)} calibration tokens: {len(parts)} prompt(s) of {len(parts[0])} tokens{cut}, one canvas of {C} "
        f"each, {n} thread{'s' if n > 1 else ''}")
    t0 = time.perf_counter()
    progress = None
    if not quiet and common.err.is_terminal:  # piped, a transient bar leaves an empty line behind
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("imatrix"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=common.err, transient=True)
        task = progress.add_task("chunks", total=len(parts))
        progress.start()
    try:
        im = collect(model, parts, batch=batch, steps=steps, seed=seed, datasets=datasets,
                     on_chunk=(lambda done, total: progress.update(task, completed=done)) if progress else None)
    finally:
        if progress is not None:
            progress.stop()
    try:
        im.save(target, fmt, overwrite)
    except OSError as e:  # e.g. a full disk: name the output, not its temporary name (already removed)
        if e.filename is None or Path(str(e.filename)).name.startswith(f".{target.name}."):
            e.filename = str(target)
        raise
    say(f"{len(im.entries)} weights, {len(parts)} chunk{'s' if len(parts) > 1 else ''} in {time.perf_counter() - t0:.1f}s")
    out.print(f"wrote {target}")
