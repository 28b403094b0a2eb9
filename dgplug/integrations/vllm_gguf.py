"""GGUF in vLLM: `vllm serve DIR --load-format dgplug-gguf` with dgplug's model class.

vLLM 0.32 to 0.34 have no GGUF loader of their own. dgplug's plugin registers the load format
``dgplug-gguf``: the weights come from the one ``.gguf`` file in DIR through
``converters.gguf_import.iter_hf_tensors(packed=True)`` into the model's ``load_weights``, so the
expert stacks stay in their ggml blocks (decoded inside dgplug's MoE) and the other tensors are
dequantised to the model dtype, as for ``dgplug.load``.

vLLM reads config.json and the tokenizer from DIR before any weight. A GGUF alone (llama.cpp's
converter, a hub GGUF repository) becomes such a directory with

    python -m dgplug.integrations.vllm_gguf MODEL.gguf DIR

which writes config.json (architecture DGPlugDiffusionGemmaForBlockDiffusion) and
generation_config.json from the GGUF's metadata, the tokenizer from its vocabulary, and links the
file. A checkpoint directory that already has config.json and a tokenizer just needs the .gguf
beside them (then pass ``--hf-overrides '{"architectures": ["DGPlugDiffusionGemmaForBlockDiffusion"]}'``).

The loader is registered when vLLM's model_loader module is imported (an import hook; importing
it at plugin load would cost seconds in every vLLM process).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

LOAD_FORMAT = "dgplug-gguf"
LOADER_MODULE = "vllm.model_executor.model_loader"
ARCH = "DGPlugDiffusionGemmaForBlockDiffusion"


def find_gguf(model) -> Path:
    """The one .gguf file of the model directory `model` (vLLM's --model)."""
    d = Path(model)
    if d.is_file():
        raise ValueError(f"{d}: --load-format {LOAD_FORMAT} takes the directory holding the .gguf and its "
                         f"config.json (make one with: python -m dgplug.integrations.vllm_gguf {d} DIR)")
    files = sorted(d.glob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise ValueError(f"{d}: --load-format {LOAD_FORMAT} needs exactly one .gguf file in the directory "
                         f"(found: {found})")
    return files[0]


def prepare_serving_dir(gguf, out, overwrite: bool = False) -> Path:
    """Write DIR for `vllm serve DIR --load-format dgplug-gguf` from a GGUF file alone."""
    from dgplug.converters.gguf_import import hf_config_files, open_gguf, tokenizer_from_gguf

    gguf, out = Path(gguf).resolve(), Path(out).absolute()
    if out.resolve() == gguf.parent or out.resolve() in gguf.parents:
        raise ValueError(f"{out} holds {gguf}: choose another output directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite (overwrite=True) to replace it")
    reader = open_gguf(gguf)  # validated, parsed once for the config and the tokenizer
    raw, gen = hf_config_files(reader)
    raw["architectures"] = [ARCH]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; vLLM may run as another user
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tokenizer_from_gguf(reader).save_pretrained(str(tmp))
        os.symlink(gguf, tmp / (gguf.name if gguf.suffix == ".gguf" else gguf.name + ".gguf"))
        if out.exists() or out.is_symlink():  # the old one aside until the new one is in place
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    return out


def loader_class():
    """vLLM's BaseModelLoader for a directory holding one GGUF (built on first use)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from dgplug.converters.gguf_import import iter_hf_tensors, validate_gguf

    class DGPlugGGUFLoader(BaseModelLoader):
        def download_model(self, model_config) -> None:  # local files only
            validate_gguf(find_gguf(model_config.model))

        def load_weights(self, model, model_config) -> None:
            path = find_gguf(model_config.model)
            if type(model).__name__ != ARCH:
                raise ValueError(f"{path}: --load-format {LOAD_FORMAT} loads dgplug's {ARCH} only, not "
                                 f"{type(model).__name__} (pass --hf-overrides '{{\"architectures\": [\"{ARCH}\"]}}')")
            validate_gguf(path)
            loaded = model.load_weights(iter_hf_tensors(path, packed=True))
            missing = {n for n, _ in model.named_parameters()} - set(loaded) - {"lm_head.weight"}
            if missing:
                raise ValueError(f"{path}: no tensor for {len(missing)} parameters, e.g. {sorted(missing)[:3]}")

    return DGPlugGGUFLoader


def _register(module) -> None:
    if LOAD_FORMAT in getattr(module, "_LOAD_FORMAT_TO_MODEL_LOADER", {}):
        return
    try:
        module.register_model_loader(LOAD_FORMAT)(loader_class())
    except Exception as e:  # noqa: BLE001 - never break vLLM's own import of its loaders
        import logging

        logging.getLogger("dgplug.vllm").warning("dgplug: could not register --load-format %s: %s", LOAD_FORMAT, e)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Registers the load format right after vLLM's model_loader module is imported (the real
    import: a find_spec alone changes nothing; the finder leaves sys.meta_path once it ran)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != LOADER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, finder = spec.loader.exec_module, self

        def exec_module(module):
            run(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec


def register_loader() -> None:
    """Make `--load-format dgplug-gguf` known to vLLM (now, or when its loader module loads)."""
    if LOADER_MODULE in sys.modules:
        _register(sys.modules[LOADER_MODULE])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dgplug.integrations.vllm_gguf",
                                 description="Make a directory for `vllm serve DIR --load-format dgplug-gguf`.")
    ap.add_argument("gguf", help="the GGUF file (dgplug convert, llama.cpp's converter, a hub GGUF)")
    ap.add_argument("out", help="the directory to write: config.json, generation_config.json, tokenizer, a link "
                                "to the GGUF")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a = ap.parse_args(argv)
    try:
        out = prepare_serving_dir(a.gguf, a.out, a.overwrite)
    except Exception as e:  # noqa: BLE001 - one line for the user
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}; serve it with: vllm serve {out} --load-format {LOAD_FORMAT}  (or examples/serve_vllm.sh {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
