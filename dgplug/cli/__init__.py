"""The `dgplug` command line (typer): thin commands over dgplug/cli/*.py.

Importing this module imports neither torch nor transformers (`dgplug --help` answers at once);
each command imports what it needs when it runs. Errors print one line on stderr (`--debug`
shows the traceback), results go to stdout, and no text is ever read as rich markup.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional


def _exit_quietly(signum, frame):
    """Ctrl-C or SIGTERM outside a command's run (starting, parsing, exiting): what was printed is
    flushed and the process ends with 130 / 143, no traceback. A command's run raises instead, so
    that its temporary outputs are removed (common.signals)."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: nothing more to save
            pass
    os._exit(128 + signum)


_SCRIPT = os.path.basename(sys.argv[0]) == "dgplug"  # the console script (not an import by tests or a program)
if _SCRIPT:
    for _s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_s, _exit_quietly)

import typer  # noqa: E402
from rich.markup import escape  # noqa: E402

from . import common  # noqa: E402


class _HelpWithoutValue:
    """--help shown as the flag it is: typer prints its type, `<bool>`, as if it took a value."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Group(_HelpWithoutValue, typer.core.TyperGroup):
    pass


class _Command(_HelpWithoutValue, typer.core.TyperCommand):
    pass


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="DiffusionGemma, run with dgplug. Every command takes --debug and --quiet; "
                       "those that compute take --threads (or DGPLUG_THREADS).")


def flag(default: bool, *decls, **kw):
    """A boolean option, shown in --help without a value placeholder (it takes none)."""
    return typer.Option(default, *decls, metavar="", **kw)


# options shared by the commands (accepted before or after the subcommand)
DEBUG = flag(False, "--debug", help="Show Python tracebacks on errors.")
QUIET = flag(False, "--quiet", help="Only results (and errors) on the terminal: no loading or progress lines.")
THREADS = typer.Option(None, "--threads", help="CPU threads for torch (default: DGPLUG_THREADS if set, else "
                                               "dgplug's choice for the model's size).", show_default=False)
DEVICE = typer.Option(None, "--device", help="cpu (default), cuda or cuda:N.", show_default=False)
JSON = flag(False, "--json", help="Print one JSON object instead of tables and text.")


def entry(script: bool | None = None):
    """The `dgplug` console script (and `python -m dgplug.cli`). The commands load models with dgplug.load,
    never through transformers' Auto classes, so dgplug's registration with transformers is skipped.
    As the script (`script`, default: started as `dgplug`) it ends the process without tearing the
    interpreter down (_end); called from a program, it raises SystemExit as click does."""
    for s in (signal.SIGINT, signal.SIGTERM):  # until a command runs, and after it (python -m dgplug.cli too)
        signal.signal(s, _exit_quietly)
    import dgplug

    dgplug._drop_transformers_hook()
    try:
        common.main(app)
    except SystemExit as e:
        if not (script if script is not None else _SCRIPT):
            raise
        _end(e.code)


def _end(code) -> None:
    """The script's exit once its command is done: output flushed, atexit's functions run, and no
    teardown of the interpreter's modules, which for torch and transformers took 0.8 s (info) to 2 s
    (generate) after the last line printed, the shell's prompt waiting for it. Nothing of dgplug's
    needs it: outputs are closed and renamed by the commands themselves."""
    if isinstance(code, str):
        sys.stderr.write(code + "\n")
        code = 1
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: nothing more to save
            pass
    import atexit

    atexit._run_exitfuncs()
    os._exit(code or 0)


def _seed(value: int) -> int:
    """--seed as torch takes it: a 64-bit number (signed or not)."""
    if not -(2**63) <= value < 2**64:
        raise typer.BadParameter(f"a seed is a 64-bit number, from {-(2**63)} to {2**64 - 1}")
    return value


def _version(value: bool):
    if value:
        from dgplug import __version__

        common.out.print(f"dgplug {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: bool = DEBUG, quiet: bool = QUIET,
         version: bool = flag(False, "--version", callback=_version, is_eager=True,
                              help="Print dgplug's version and exit.")):
    common.STATE.update(debug=debug, quiet=quiet)


@app.command(cls=_Command)
def info(path: str = typer.Argument(..., metavar="PATH", help="Checkpoint directory (safetensors or dgplug-quantized), "
                                                ".gguf file, or a directory holding one; sudoku: the embedded model."),
         as_json: bool = JSON, debug: bool = DEBUG, quiet: bool = QUIET):
    """Architecture, layer pattern, parameter counts (total / active), format, dtype and size.

    Example: dgplug info ./diffusiongemma-int4
    """

    def go():
        from .info import describe, show_info
        from .paths import model_arg

        d = describe(model_arg(str(path)))
        if as_json:
            import json

            common.out.print(json.dumps(d))
        else:
            show_info(d)

    common.run(go, debug, quiet)


@app.command(cls=_Command)
def generate(
    path: str = typer.Argument(..., metavar="PATH", help="Checkpoint directory or .gguf file; sudoku: the embedded model."),
    text: Optional[str] = typer.Argument(None, metavar="PROMPT", show_default=False,
                                         help="Prompt text, as --prompt (give one of the two); - reads it from "
                                              "standard input."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (the checkpoint's tokenizer)."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Prompt token ids, comma separated (instead of --prompt)."),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", "-n", show_default=False,
        help="Tokens to print (default: the checkpoint's). Whole canvases are generated and cut to this."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Max denoising steps per canvas.", show_default=False),
    seed: int = typer.Option(0, "--seed", callback=_seed, help="Seed of the starting canvas and of the sampler."),
    rng: str = typer.Option("counter", "--rng", help="counter (fused, default) or transformers (bit-exact)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", show_default=False,
                                        help="fp32, bf16 or fp16 (default: the checkpoint's; a GGUF's: fp32, "
                                             "bf16 on a GPU)."),
    chat: bool = flag(True, "--chat/--no-chat", help="Wrap the prompt in the chat template."),
    live: bool = flag(False, "--live", help="Show the canvas being denoised."),
    edit: Optional[str] = typer.Option(
        None, "--edit", show_default=False,
        help=escape("In-line edit: TEXT with [[spans to rewrite]] and [[+N]] insertions of N tokens; the rest stays "
                    "locked on the canvas (the prompt, if any, is the instruction); - reads it from standard "
                    "input.")),
    threads: Optional[int] = THREADS, device: Optional[str] = DEVICE, as_json: bool = JSON,
    debug: bool = DEBUG, quiet: bool = QUIET,
):
    """Generate text with the EntropyBound block-diffusion sampler (or edit a text in place).

    Example: dgplug generate ./ckpt "Why is the sky blue?" --max-new-tokens 64 --live

    From a file: dgplug generate ./ckpt - < question.txt
    """
    from .generate import Options, read_stdin, run

    o = Options(path, prompt if text is None else text, ids, max_new_tokens, steps, seed, rng, dtype, chat, live, edit,
                threads, device, as_json)

    def go():
        if text is not None and prompt is not None:
            raise common.CLIError("give the prompt once: as the argument after the path or as --prompt, not both")
        read_stdin(o)
        run(o)

    common.run(go, debug, quiet)


@app.command(cls=_Command)
def demo(
    n: Optional[int] = typer.Option(None, "-n", "--count", show_default=False,
                                    help="Puzzles solved together in one batch (default 20; fewer when the band "
                                         "holds fewer)."),
    givens: Optional[str] = typer.Option(None, "--givens", show_default=False,
                                         help="Band of givens, e.g. 25-29 (default 36-45)."),
    puzzle: Optional[str] = typer.Option(None, "--puzzle", show_default=False,
                                         help="Your own puzzle: 81 characters row by row, digits 1-9, '.' or 0 "
                                              "for blanks."),
    shown: Optional[int] = typer.Option(None, "--show", show_default=False,
                                        help="Grids drawn, the ones with the fewest givens: live, side by side "
                                             "(as many as fit the terminal), then at the end (default 3)."),
    steps: Optional[int] = typer.Option(None, "--steps", show_default=False,
                                        help="At most this many denoising steps (default: the checkpoint's, 48)."),
    seed: int = typer.Option(0, "--seed", callback=_seed, help="Seed of the starting canvas and of the sampler."),
    live: bool = flag(True, "--live/--no-live", help="Redraw the grids as they are denoised."),
    compare: bool = flag(False, "--compare", help="Then solve the same puzzles left to right (one cell "
                         "per forward, same model) and print that line too."),
    old_n: Optional[int] = typer.Option(None, "--n", hidden=True),  # older name of -n/--count
    sample: Optional[int] = typer.Option(None, "--sample", hidden=True),  # older name of -n/--count
    old_shown: Optional[int] = typer.Option(None, "--puzzles", hidden=True),  # older name of --show
    threads: Optional[int] = THREADS, device: Optional[str] = DEVICE, debug: bool = DEBUG, quiet: bool = QUIET,
):
    """The embedded default model: Sudoku solved on the canvas (live), then a one-line summary.

    Example: dgplug demo --givens 25-29 -n 10 --compare

    Example (spaces and line breaks inside the quotes are left out):

    dgplug demo --puzzle "53..7....6..195....98....6. 8...6...34..8.3..17...2...6 .6....28....419..5....8..79"
    """
    from .demo import run

    def go():
        counts = [(f, v) for f, v in (("-n", n), ("--n", old_n), ("--sample", sample)) if v is not None]
        if len(counts) > 1:
            raise common.CLIError(f"give {counts[0][0]} or {counts[1][0]} (an older name of -n), not both")
        shows = [(f, v) for f, v in (("--show", shown), ("--puzzles", old_shown)) if v is not None]
        if len(shows) > 1:
            raise common.CLIError("give --show or --puzzles (its older name), not both")
        n_flag, count = counts[0] if counts else ("-n", None)
        n_flag = "-n/--count" if n_flag == "-n" else n_flag  # typer does not say which of the two was typed
        show_flag, show = shows[0] if shows else ("--show", 3)
        run(count, givens, puzzle, show, steps, seed, live, threads, device, n_flag, compare=compare,
            show_flag=show_flag)

    common.run(go, debug, quiet)


@app.command(cls=_Command)
def convert(
    ctx: typer.Context,
    src: str = typer.Argument(..., metavar="SRC", help="Hugging Face DiffusionGemma directory, or a DiffusionGemma "
                                                       "GGUF (requantized as llama-quantize does); sudoku: the "
                                                       "embedded model."),
    out: Optional[str] = typer.Argument(None, metavar="OUT", show_default=False,
                                        help="OUT.gguf for GGUF types, a directory for int4/int8/fp8 (none with "
                                             "--dry-run)."),
    quant: str = typer.Option(..., "--quant", "-q",
                              help="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_L "
                                   "Q3_K_M Q3_K_S Q2_K Q2_K_S IQ4_XS IQ4_NL (GGUF, any case; llama-quantize's aliases "
                                   "Q5_K Q4_K Q3_K are Q5_K_M Q4_K_M Q3_K_M, its numbers too, 15 = Q4_K_M; Q2_K_S needs --imatrix; "
                                   "COPY: a GGUF SRC's tensors as they are) or int4 int8 fp8 (safetensors)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", show_default=False,
                                             help="int4 only: group size along the input dimension (default 128)."),
    overwrite: bool = flag(False, "--overwrite",
                           help="Replace an earlier output at OUT (a GGUF, a dgplug-quantized directory)."),
    threads: Optional[int] = typer.Option(None, "--threads", show_default=False,
                                          help="GGUF: worker processes; int4/int8/fp8: torch threads "
                                               "(default: DGPLUG_THREADS, else dgplug's choice)."),
    imatrix: Optional[str] = typer.Option(None, "--imatrix", show_default=False,
                                          help="int4 and the GGUF block types but Q8_0 (Q6_K .. Q2_K_S, IQ4_XS, IQ4_NL, "
                                               "Q4_0 .. Q5_1): an importance matrix (from `dgplug imatrix` or llama-imatrix, "
                                               "GGUF or legacy .dat) weights the scale search (GGUF: as llama-quantize --imatrix)."),
    tensor_type: Optional[list[str]] = typer.Option(None, "--tensor-type", show_default=False, metavar="PATTERN=TYPE",
                                                    help="GGUF, as llama-quantize: tensors whose name PATTERN (a regex) "
                                                         "matches get TYPE (the first matching option wins; repeatable), "
                                                         "e.g. --tensor-type ffn_down_exps=q6_k."),
    pure: bool = flag(False, "--pure", help="GGUF, as llama-quantize: no mix rules, every quantized tensor the base type."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", show_default=False,
                                                       metavar="TYPE", help="GGUF: the type of token_embd.weight."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", show_default=False, metavar="TYPE",
                                                     help="GGUF: the type of the output head (tied: token_embd.weight)."),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", show_default=False, metavar="N[K|M|G]",
                                                 help="GGUF: shards of at most N bytes of tensors (K/M/G: 1000^1..3, as "
                                                      "llama.cpp), named OUT-00001-of-0000n.gguf; e.g. 48G."),
    split_max_tensors: Optional[int] = typer.Option(None, "--split-max-tensors", show_default=False,
                                                    help="GGUF: shards of at most N tensors."),
    keep_split: bool = flag(False, "--keep-split", help="A split GGUF SRC, as llama-quantize: OUT in the same shards "
                                                        "(OUT-00001-of-0000n.gguf)."),
    dry_run: bool = flag(False, "--dry-run", help="As llama-quantize: print the types and sizes the output would "
                                                  "have (per type, with bits per weight) and write nothing."),
    allow_requantize: bool = flag(False, "--allow-requantize",
                                  help="A GGUF SRC, as llama-quantize: quantize tensors that are quantized already "
                                       "(worse than from the original weights); without it only F32/F16/BF16 "
                                       "tensors are."),
    debug: bool = DEBUG, quiet: bool = QUIET,
):
    """Convert a checkpoint to GGUF (K-quants) or quantized safetensors, streaming.

    Example: dgplug convert ./diffusiongemma ./dg-Q4_K_M.gguf --quant Q4_K_M

    Example: dgplug convert ./diffusiongemma ./dg-int4 --quant int4 --group-size 64

    Example: dgplug convert ./dg-BF16.gguf ./dg-Q4_K_M.gguf --quant Q4_K_M

    Example: dgplug convert ./diffusiongemma --quant Q3_K_M --dry-run
    """
    from .convert import run

    if out is None and not dry_run:
        raise common._click_class("UsageError")("Missing argument 'OUT' (only --dry-run goes without one)", ctx=ctx)
    per_tensor = dict(tensor_type=tuple(tensor_type or ()), pure=pure, token_embedding_type=token_embedding_type,
                      output_tensor_type=output_tensor_type, split_max_size=split_max_size,
                      split_max_tensors=split_max_tensors, keep_split=keep_split)
    common.run(lambda: run(src, out, quant, group_size, overwrite, threads, quiet or common.STATE["quiet"], imatrix,
                           per_tensor, allow_requantize, dry_run), debug, quiet)


@app.command("imatrix", cls=_Command)
def imatrix_cmd(
    src: str = typer.Argument(..., metavar="SRC", help="Checkpoint directory or .gguf file (with its tokenizer); sudoku: the embedded model."),
    calib: str = typer.Option(..., "--calib", help="Calibration text: a UTF-8 .txt file or a directory of them."),
    out: str = typer.Option(..., "--output", "-o", help="The imatrix file to write."),
    output_format: Optional[str] = typer.Option(None, "--output-format", show_default=False,
                                                help="gguf (default) or dat: llama.cpp's legacy layout, for older "
                                                     "llama.cpp builds and ik_llama.cpp."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", show_default=False,
                                             help="Tokens per calibration prompt (default 512, as llama-imatrix; "
                                                  "less where the model's context minus a canvas is shorter)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", show_default=False, help="Use at most this many prompts."),
    batch: int = typer.Option(1, "--batch", help="Prompts per generate call."),
    steps: Optional[int] = typer.Option(None, "--steps", show_default=False,
                                        help="Max denoising steps per canvas (default: the checkpoint's)."),
    seed: int = typer.Option(0, "--seed", callback=_seed, help="Seed of the starting canvases and of the sampler."),
    overwrite: bool = flag(False, "--overwrite", help="Replace an earlier imatrix at the output."),
    threads: Optional[int] = THREADS, device: Optional[str] = DEVICE, debug: bool = DEBUG, quiet: bool = QUIET,
):
    """Importance matrix for calibrated quantization, in llama.cpp's imatrix GGUF (or legacy .dat) layout.

    Runs the model's own block-diffusion path: the encoder over each prompt, denoise steps on a canvas.
    Every linear and expert gets the sum of its squared inputs per column, and their count.

    Example: dgplug imatrix ./diffusiongemma --calib calib.txt -o imatrix.gguf
    """
    from .imatrix import run

    common.run(lambda: run(src, calib, out, chunk_size, chunks, batch, steps, seed, overwrite, threads, device,
                           quiet or common.STATE["quiet"], output_format), debug, quiet)


@app.command(cls=_Command)
def inspect(path: str = typer.Argument(..., metavar="PATH", help="A .gguf file (or a directory holding one)."),
            as_json: bool = JSON, debug: bool = DEBUG, quiet: bool = QUIET):
    """GGUF metadata, tensor table, and a check against the DiffusionGemma GGUF contract.

    Example: dgplug inspect ./dg-Q4_K_M.gguf
    """

    def go():
        from .info import inspect as show
        from .paths import gguf_arg

        code = show(gguf_arg(str(path)), as_json)
        if code:
            raise typer.Exit(code)

    common.run(go, debug, quiet)
