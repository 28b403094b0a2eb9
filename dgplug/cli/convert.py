"""`dgplug convert`: every option checked before a byte is read, one overwrite rule, threads.

SIGINT and SIGTERM are handled by the CLI's `signals()` (see common.py): the main process
raises, the converter's cleanup removes its temporary output, and forked workers leave quietly.
"""

from __future__ import annotations

import os

from .common import CLIError, say
from .paths import QUANT_SCHEMES, output_arg, source_arg


def quant_arg(quant: str, group_size: int | None) -> str:
    from dgplug.converters.gguf_export import ALIASES, FILE_TYPES as GGUF_TYPES, file_type

    q = quant.strip()
    if q.upper() == "COPY":  # llama-quantize's: every tensor as it is (a GGUF source; checked with it)
        q = "COPY"
    elif q.isdigit():  # llama-quantize's numbers: the file type's general.file_type (15 = Q4_K_M)
        from dgplug.converters.gguf_export import RECIPES

        q = next((name for name, r in RECIPES.items() if int(r["ftype"]) == int(q)), q)
    if q.lower() in QUANT_SCHEMES:
        q = q.lower()
    elif q == "COPY" or file_type(q) in GGUF_TYPES:  # any case; llama-quantize's aliases (Q4_K = Q4_K_M, ...)
        q = file_type(q)
    else:
        raise CLIError(f"--quant {quant!r}: choose a GGUF type ({', '.join(GGUF_TYPES)}; aliases "
                       f"{', '.join(f'{a} = {t}' for a, t in ALIASES.items())}) "
                       f"or a safetensors scheme ({', '.join(QUANT_SCHEMES)})")
    if group_size is not None and q != "int4":
        raise CLIError(f"--group-size applies to int4 only ({q} {'uses fixed blocks' if q in GGUF_TYPES else 'scales per row'})")
    if group_size is not None and (group_size <= 0 or group_size % 2):
        raise CLIError(f"--group-size {group_size}: give a positive even number")
    return q


def split_size_arg(text: str | None) -> int:
    """--split-max-size as llama.cpp reads it (split_str_to_n_bytes): bytes, or K / M / G = 1000^1..3."""
    if text is None:
        return 0
    t = text.strip().upper()
    scale = {"K": 1000, "M": 1000**2, "G": 1000**3}.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    if not digits.isdigit() or int(digits) <= 0:
        raise CLIError(f"--split-max-size {text!r}: give a positive number of bytes, or with K, M or G (e.g. 48G)")
    return int(digits) * scale


def gguf_options_arg(q: str, per_tensor: dict | None) -> dict:
    """The GGUF-only options (llama-quantize's per-tensor ones, llama.cpp's split ones) -> export_gguf's
    keyword arguments; any of them with a safetensors scheme is one error."""
    given = {k: v for k, v in (per_tensor or {}).items() if v is not None and v is not False and v != ()}
    if not given:
        return {}
    if q in QUANT_SCHEMES:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise CLIError(f"{names}: GGUF options (llama.cpp's); --quant {q} writes safetensors")
    from dgplug.converters.gguf_export import parse_overrides
    from dgplug.errors import InputError

    kw = {"split_max_size": split_size_arg(given.pop("split_max_size", None)),
          "keep_split": given.pop("keep_split", False)}
    tensors = given.pop("split_max_tensors", None)
    if tensors is not None and tensors <= 0:
        raise CLIError(f"--split-max-tensors {tensors}: give a positive number")
    kw["split_max_tensors"] = tensors or 0
    try:
        kw["overrides"] = parse_overrides(**given) if given else None
    except InputError as e:
        raise CLIError(str(e)) from None
    return kw


def dry_run(src: str, source, q: str, group_size: int | None, imatrix: str | None, gguf_kw: dict,
            allow_requantize: bool) -> None:
    """What the conversion would write, per ggml type (or per kept / quantized kind for int4/int8/fp8),
    and its size, as llama-quantize --dry-run; nothing is written."""
    import math

    from rich.table import Table

    from . import common
    from .info import human

    rows: dict[str, list[int]] = {}

    def add(label: str, params: int, nbytes: int) -> None:
        r = rows.setdefault(label, [0, 0, 0])
        r[0], r[1], r[2] = r[0] + 1, r[1] + params, r[2] + nbytes

    if q in QUANT_SCHEMES:
        from dgplug.checkpoint import dtype_name
        from dgplug.converters.quant import plan_conversion

        _, jobs = plan_conversion(source, q, group_size or 128, allow_requantize=allow_requantize)
        size_in = sum(j.in_bytes for j in jobs)
        for j in jobs:
            add(q if j.action != "copy" else f"{dtype_name(j.dtype)} (kept)", math.prod(j.shape),
                sum(o.nbytes for o in j.outs))
    else:
        from dgplug.converters.gguf_export import plan_gguf

        _, _, items, _, _ = plan_gguf(source, q, imatrix is not None, gguf_kw.get("overrides"), allow_requantize)
        size_in = sum(it.src.nbytes for it in items if it.src is not None)
        for it in items:
            add(it.qtype.name, math.prod(it.shape), it.nbytes)
    t = Table(box=None)
    for col in ("type", "tensors", "parameters", "size", "bits per weight"):
        t.add_column(col, justify="left" if col == "type" else "right")
    for label, (n, params, nbytes) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        t.add_row(label, str(n), human(params), human(nbytes, "B"), f"{8 * nbytes / params:.2f}")
    common.out.print(t)
    params, nbytes = sum(r[1] for r in rows.values()), sum(r[2] for r in rows.values())
    common.out.print(f"{src} as {q}: {human(nbytes, 'B')} of tensors, {8 * nbytes / params:.2f} bits per weight, "
                     f"from {human(size_in, 'B')}; nothing written (--dry-run)")


def run(src: str, out: str | None, quant: str, group_size: int | None, overwrite: bool, threads: int | None,
        quiet: bool, imatrix: str | None = None, per_tensor: dict | None = None, allow_requantize: bool = False,
        dry: bool = False) -> None:
    from pathlib import Path

    from . import common

    q = quant_arg(quant, group_size)
    gguf_kw = gguf_options_arg(q, per_tensor)
    if imatrix is None and q not in QUANT_SCHEMES and q != "COPY":
        from dgplug.converters.gguf_export import RECIPES

        if RECIPES[q]["imatrix"]:
            raise CLIError(f"--quant {q} needs --imatrix (llama-quantize refuses {q} without an importance matrix): "
                           f"make one with `dgplug imatrix {src} --calib TEXT -o imatrix.gguf`")
    if imatrix is not None:
        from dgplug.converters.gguf_export import IMATRIX_FILE_TYPES

        if q not in ("int4",) + IMATRIX_FILE_TYPES:
            why = ("llama.cpp's Q8_0 has no importance path" if q == "Q8_0"
                   else "no search to weight" if q in ("int8", "fp8") else "not quantized")
            raise CLIError(f"--imatrix applies to --quant int4, {', '.join(IMATRIX_FILE_TYPES)} ({q}: {why})")
        if not Path(imatrix).is_file():
            raise CLIError(f"--imatrix {imatrix}: no such file")
    source = source_arg(src)
    gguf_source = isinstance(source, Path) and source.is_file()
    if allow_requantize and not gguf_source:
        raise CLIError(f"--allow-requantize applies to a GGUF source; {src} is a checkpoint of original weights")
    if dry:
        return dry_run(src, source, q, group_size, imatrix, gguf_kw, allow_requantize)
    target = output_arg(out, source, q, overwrite)
    if gguf_source:  # the output must not replace any shard of the source (a split GGUF's others too)
        from dgplug.converters.gguf_import import shard_paths, validate_gguf
        from dgplug.errors import FormatError

        try:
            shards = shard_paths(source, validate_gguf(source)["metadata"])
        except FormatError as e:
            raise CLIError(str(e)) from None
        if target.exists() and any(target.resolve() == p.resolve() for p in shards if p.exists()):
            raise CLIError(f"{out} is a shard of the source: choose another output")
    if imatrix is not None and target.exists() and os.path.samefile(target, imatrix):
        raise CLIError(f"{out} is the --imatrix file: choose another output")
    user_threads = common.threads_arg(threads)
    common.set_threads(user_threads)
    say(f"converting {src} to {q}")
    try:
        if q in QUANT_SCHEMES:
            from dgplug.converters.quant import quantize_checkpoint

            quantize_checkpoint(source, target, q, group_size=group_size or 128, progress=not quiet,
                                overwrite=overwrite, imatrix=imatrix, allow_requantize=allow_requantize)
        else:
            from dgplug.converters.gguf_export import export_gguf

            first = export_gguf(source, target, quant=q, progress=not quiet, workers=user_threads, imatrix=imatrix,
                                overwrite=overwrite, allow_requantize=allow_requantize, **gguf_kw)
            if first != target:  # shards: name them all
                from dgplug.converters.gguf_import import SPLIT_NAME

                n = int(SPLIT_NAME.match(first.name)["count"])
                target = ", ".join(str(first).replace("-00001-of-", f"-{i:05d}-of-") for i in range(1, n + 1))
    except (KeyboardInterrupt, common.Terminated):  # the temporary output is gone by now (the converters' cleanup ran)
        from rich.text import Text

        common.err.print(Text(f"{target}: not written; its temporary files were removed"))
        raise
    except OSError as e:  # e.g. a full disk: name the output, not its temporary name (already removed)
        if e.filename is None or any(part.startswith(f".{target.name}.") for part in Path(str(e.filename)).parts):
            e.filename = str(target)
        raise
    common.out.print(f"wrote {target}")
