"""Path arguments checked for kind before any work: a directory, a GGUF file (magic), a
safetensors file (header), another file, or a Hugging Face hub id. Reads at most a few bytes, so
a multi-GB file given by mistake costs nothing; every refusal is one line naming the path."""

from __future__ import annotations

from pathlib import Path

from .common import CLIError

FILE_SUFFIXES = {".gguf", ".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".txt",
                 ".jinja", ".model", ".onnx", ".npz", ".npy", ".zip", ".tar", ".gz"}
QUANT_SCHEMES = ("int4", "int8", "fp8")


def looks_like_hub_id(s: str) -> bool:
    """"owner/name": exactly one '/', no leading '/', '.' or '~', and no file suffix."""
    owner, _, name = s.partition("/")
    return (s.count("/") == 1 and bool(owner) and bool(name) and not s.startswith((".", "~"))
            and Path(name).suffix.lower() not in FILE_SUFFIXES)


def kind(s: str) -> str:
    """'dir', 'gguf', 'safetensors', 'file' or 'hub'; a path that is none of these is an error."""
    p = Path(s)
    if p.is_dir():
        return "dir"
    if p.is_file():
        try:
            with open(p, "rb") as f:
                head = f.read(9)
        except OSError as e:
            raise CLIError(f"{s}: {(e.strerror or str(e)).lower()}") from None
        if head[:4] == b"GGUF":
            return "gguf"
        n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
        if head[8:9] == b"{" and 2 <= n <= p.stat().st_size - 8:
            return "safetensors"
        return "file"
    if p.exists():
        raise CLIError(f"{s}: neither a file nor a directory")
    if looks_like_hub_id(s):
        return "hub"
    raise CLIError(f"no such file or directory: {s}")


def _not_a_model(s: str, k: str, wanted: str) -> CLIError:
    if k == "safetensors":
        parent = Path(s).resolve().parent
        return CLIError(f"{s} is a safetensors file: give the checkpoint directory that holds it ({parent})")
    return CLIError(f"{s} is a file that is neither GGUF nor safetensors: {wanted}")


EMBEDDED = "sudoku"  # the name of the shipped Sudoku model on the command line


def embedded(s: str) -> str:
    """`sudoku`, where no file or directory of that name is here, is the shipped model's directory
    (dgplug/data/sudoku inside the package: a wheel's users need not find it); else s."""
    if s == EMBEDDED and not Path(s).exists():
        from dgplug.assets import sudoku_model_path

        return str(sudoku_model_path() or s)
    return s


def _checkpoint_dir(s: str) -> Path:
    """A directory with a config.json or a .gguf file: else one line saying what it holds."""
    p = Path(s)
    if (p / "config.json").exists() or any(p.glob("*.gguf")):
        return p
    if (p / "config.json").is_symlink():  # a hub cache's link to a blob that never arrived
        raise CLIError(f"{p / 'config.json'} is a broken link (an incomplete download?)")
    if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists():
        raise CLIError(f"{s} holds safetensors but no config.json: a checkpoint needs both")
    if not any(p.iterdir()):
        raise CLIError(f"{s} is an empty directory: not a checkpoint (no config.json or .gguf)")
    raise CLIError(f"{s} has no config.json and no .gguf file: not a checkpoint directory")


def model_arg(s: str):
    """What `dgplug.load` accepts: a checkpoint directory, a .gguf file, or a hub id (passed on as is)."""
    s = embedded(s)
    k = kind(s)
    if k == "hub":
        return s
    if k == "dir":
        return _checkpoint_dir(s)
    if k == "gguf":
        return Path(s)
    raise _not_a_model(s, k, "give a checkpoint directory or a GGUF file")


def source_arg(s: str):
    """convert's SRC: a Hugging Face checkpoint directory, a hub id, or a GGUF file (a split GGUF's
    first shard), which is requantized as llama-quantize does."""
    s = embedded(s)
    k = kind(s)
    if k == "hub":
        return s
    if k == "gguf":
        return Path(s)
    if k == "dir":
        d = _checkpoint_dir(s)
        if (d / "config.json").exists():
            return d
        from dgplug.converters.gguf_import import model_file

        found = sorted(d.glob("*.gguf"))
        if (one := model_file(found)) is not None:  # the one GGUF, or one split GGUF's first shard
            return one
        raise CLIError(f"{s} holds several .gguf files ({', '.join(f.name for f in found)}): name one")
    raise _not_a_model(s, k, "convert reads a Hugging Face checkpoint directory (config.json + safetensors) "
                       "or a GGUF file")


def gguf_arg(s: str) -> Path:
    """inspect's FILE: a .gguf file, or a directory holding exactly one (or one split GGUF's shards)."""
    if embedded(s) != s:
        raise CLIError(f"{s} is the embedded model, a safetensors checkpoint: inspect reads GGUF files "
                       f"(make one with `dgplug convert {s} {s}.gguf -q Q8_0`; `dgplug info {s}` describes it)")
    k = kind(s)
    p = Path(s)
    if k == "gguf":
        return p
    if k == "dir":
        from dgplug.converters.gguf_import import model_file

        found = sorted(p.glob("*.gguf"))
        if (one := model_file(found)) is not None:  # the one file, or one split GGUF's first shard
            return one
        if not found:
            raise CLIError(f"{s} is a directory without a .gguf file: inspect reads one GGUF file")
        raise CLIError(f"{s} holds several .gguf files ({', '.join(f.name for f in found)}): name one")
    if k == "hub":
        raise CLIError(f"no such file or directory: {s}")
    raise CLIError(f"{s} is not a GGUF file (it does not start with the GGUF magic)")


def writable(out: str, flag: str = "") -> Path:
    """OUT's folder exists and takes a new file (probed with one: permissions, a read-only or
    virtual file system), before any work; the output is written there under a temporary name."""
    p = Path(out)
    parent = p.parent
    named = f"{flag} {out}" if flag else out
    if not parent.exists():
        raise CLIError(f"{named}: no such directory {parent} (create it first)")
    if not parent.is_dir():
        raise CLIError(f"{named}: {parent} is not a directory")
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".dgplug-probe-"):
            pass
    except OSError as e:
        raise CLIError(f"{named}: cannot write in {parent} ({(e.strerror or str(e)).lower()})") from None
    return p


def _starts_with(p: Path, magic: bytes) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _earlier_quantized(p: Path) -> bool:
    """p holds a dgplug-quantized checkpoint (its config.json names dgplug's quantization method)."""
    import json

    from dgplug.converters.quant import QUANT_METHOD

    try:
        qc = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
        return qc.get("quant_method") == QUANT_METHOD
    except (OSError, ValueError, AttributeError):
        return False


def output_arg(out: str, src, quant: str, overwrite: bool) -> Path:
    """convert's OUT, one rule for files and directories: an existing output is refused unless
    --overwrite; GGUF types write one file, int4/int8/fp8 a directory."""
    p = Path(out)
    gguf = quant not in QUANT_SCHEMES
    if isinstance(src, Path) and p.exists() and p.resolve() == src.resolve():
        raise CLIError(f"{out} is the source: choose another output")
    if p.exists() and p.is_dir():  # replacing OUT must not take the source or the working directory with it
        if isinstance(src, Path) and p.resolve() in src.resolve().parents:
            raise CLIError(f"{out} holds the source {src}: choose another output")
        cwd = Path.cwd().resolve()
        if p.resolve() == cwd or p.resolve() in cwd.parents:
            raise CLIError(f"{out} holds the current directory: choose another output")
    if gguf:
        if p.is_dir():
            raise CLIError(f"{out} is a directory: {quant} writes one GGUF file (e.g. {p / ('model-' + quant + '.gguf')})")
        if p.is_file() and overwrite and not _starts_with(p, b"GGUF"):  # a file of the source, a document, ...
            raise CLIError(f"{out} is not a GGUF file: --overwrite replaces an earlier GGUF, not another file "
                           f"(a file of the checkpoint?); choose another output")
        if p.suffix.lower() != ".gguf":
            from .common import note

            note(f"{out} has no .gguf extension: it will be a GGUF file all the same")
    else:
        if p.suffix.lower() == ".gguf":
            raise CLIError(f"{out}: {quant} writes a directory of safetensors, not a .gguf file "
                           f"(choose a directory name, or a GGUF type such as Q8_0)")
        if p.exists() and not p.is_dir():
            raise CLIError(f"{out} is a file: {quant} writes a directory")
        if p.is_dir() and overwrite and any(p.iterdir()) and not _earlier_quantized(p):
            raise CLIError(f"{out} is not a dgplug-quantized directory: --overwrite replaces an earlier output, "
                           f"not a directory of other files; choose another output")
        if p.suffix.lower() == ".safetensors" and not p.exists():
            from .common import note

            note(f"{quant} writes a directory (config, tokenizer and safetensors shards): {out} will be one")
    if p.exists() and not overwrite and (p.is_file() or any(p.iterdir())):
        raise CLIError(f"{out} exists: pass --overwrite to replace it")
    return writable(out)
