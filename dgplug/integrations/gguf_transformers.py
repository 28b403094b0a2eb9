"""transformers loading of diffusion-gemma GGUF files: `from_pretrained(dir, gguf_file="model.gguf")`.

`register()` (idempotent; `import dgplug` calls it) teaches transformers 5.19 - 5.25 the
"diffusion-gemma" GGUF architecture (a newer release too, while its `load_gguf_checkpoint` still
takes `model_to_load`: with a warning at the first load), so that after `import dgplug`

    AutoModelForImageTextToText.from_pretrained(dir, gguf_file="model.gguf")
    DiffusionGemmaForBlockDiffusion.from_pretrained(dir, gguf_file="model.gguf")
    AutoTokenizer.from_pretrained(dir, gguf_file="model.gguf")

work, as they do for llama (AutoModel too: the bare DiffusionGemmaModel). The tokenizer of a
vocabulary with merges (Gemma's) is transformers' own gemma4 rebuild, which adds no BOS by its
policy; one without (WordLevel, such as the embedded Sudoku model's) is dgplug's rebuild, the
tokenizer `dgplug.load` gives (`_hook_word_level_tokenizers`).

How transformers 5.19 - 5.25 load a GGUF, and where this hooks in
------------------------------------------------------------------
`from_pretrained(..., gguf_file=...)` refuses to run without `accelerate` (a bare
`is_accelerate_available()` gate; nothing on the GGUF path uses it after that), then goes through
`GgufHfQuantizer` (quant_method "gguf"). There are two paths behind it:

* the new one, for architectures in `integrations.gguf.GGUF_CONFIG_ARCHS` / `GGUF_ARCHS` (qwen35,
  lfm2): the config is rebuilt from the metadata alone, tensors are renamed by `WeightRenaming`s
  and may stay packed. It cannot describe diffusion-gemma exactly: the partial rotation of the full
  layers lives only in the *data* of `rope_freqs.weight` (../shared/spec/gguf.md), and the config
  builder is handed metadata and tensor names, never the file.
* the legacy one, for everything else (llama, gemma3, ...): `modeling_gguf_pytorch_utils.
  load_gguf_checkpoint(path, return_tensors, model_to_load, torch_dtype)` gives the config dict
  (called from `PreTrainedConfig.get_config_dict` and `AutoTokenizer`) and, from
  `GgufHfQuantizer.get_state_dict`, the dequantised tensors under transformers names. Its tables
  (`GGUF_CONFIG_MAPPING`: flat key renames; tensor names from gguf-py's `MODEL_ARCH_NAMES`) cannot
  express the nested DiffusionGemma config (text_config, layer_types, per-type rope) nor its
  tensors (gguf-py does not know the architecture).

So the one patch point is `load_gguf_checkpoint`: for a file whose `general.architecture` is
"diffusion-gemma" it answers with dgplug's own reader (config from `gguf_import.gguf_to_config`,
tensors from `gguf_import.iter_hf_tensors`, names from `dgplug.names`); any other file goes to
transformers' original function unchanged. transformers 5.19 also binds the function by name in
`configuration_utils` and `models.auto.tokenization_auto` at import (5.24 imports it at call
time), so those bindings are replaced too when they hold the original.

What the loaded model holds: the text stack (decoder weights; the encoder's text layers are tied to
them by transformers) and the encoder's own layer scalars. Weights of the ggml block types dgplug
runs packed (kernels.ggml.PACKED_TYPES: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K, IQ4_XS, IQ4_NL) stay in
their blocks: before the weights load, the modules holding them are swapped for packed twins whose
one uint8 parameter `blocks` takes the file's bytes (`X.blocks` in the state dict; the tie map is
rewritten so the encoder and the tied lm_head share the decoder's blocks):

* linears (attention, dense MLP, self-conditioning, and the tied lm_head) -> `GGMLLinear`, whose
  `weight` is a kernels.ggml.GGMLWeight: F.linear decodes it per call (the head a chunk of rows at
  a time);
* the token embeddings -> `GGMLEmbedding` (only the rows looked up are decoded; transformers' soft
  embedding `torch.matmul(probs, embed_tokens.weight)` runs on the packed table chunk by chunk);
* on CUDA both keep their weight dequantised after the first use instead (one copy for a tied
  group, as dgplug.load does there; `DGPLUG_PACKED_LINEARS=1` decodes per call): per call the
  decode costs far more than the matmul;
* the routed experts -> `GGMLExperts`, running dgplug's MoE (the Triton kernel decoding the blocks on
  CUDA, the torch twin dequantising one expert at a time otherwise).

Everything else (norms, router, F32/F16/BF16 weights) is dequantised (F32/BF16 bit exact) in the
requested dtype (float32 by default), as it is without a model to load into. The vision tower is
not in a GGUF: the config carries a one-layer placeholder tower (dgplug.config.TINY_VISION) whose
weights stay randomly initialised, which transformers reports as missing keys; images need the
safetensors checkpoint. The sampler defaults stored under `diffusion.*` become the model's
`generation_config`.
"""

from __future__ import annotations

import sys

ARCH = "diffusion-gemma"
MIN_VERSION = (5, 19)  # first release with GgufHfQuantizer calling load_gguf_checkpoint(model_to_load=...)
MAX_VERSION = (5, 25)  # last release checked (5.25: its GGUF loading equals 5.24's)
_BINDERS = ("transformers.configuration_utils", "transformers.models.auto.tokenization_auto")
_ORIGINAL = None
_UNCHECKED = None  # the transformers version, when it is newer than MAX_VERSION (warned once, at a load)


def supported_version(version: str) -> bool:
    """Inside the range checked release by release."""
    from packaging.version import Version

    return MIN_VERSION <= Version(version).release[:2] <= MAX_VERSION


def _newer_than_checked(version: str) -> bool:
    from packaging.version import Version

    return Version(version).release[:2] > MAX_VERSION


def _takes_model_to_load(fn) -> bool:
    """The hook answers `load_gguf_checkpoint(path, return_tensors, model_to_load=...)` (5.19 on)."""
    import inspect

    try:
        return "model_to_load" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _architecture(path) -> str | None:
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        return read_gguf_metadata(str(path))[0].get("general.architecture")
    except Exception:  # noqa: BLE001 - not ours to judge: the original reports it
        return None


def _apply_generation_config(model, gen: dict) -> None:
    """The file's diffusion.* sampler values -> the model's generation config (transformers skips
    generation_config.json for a GGUF)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    values = {k: v for k, v in gen.items() if k != "entropy_bound"}
    try:
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        values["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=gen["entropy_bound"])
    except Exception:  # noqa: BLE001 - the class moved: keep transformers' default sampler
        pass
    for k, v in values.items():
        setattr(gc, k, v)


def load_gguf_checkpoint(gguf_checkpoint_path, return_tensors=False, model_to_load=None, torch_dtype=None, **kw):
    """transformers' `load_gguf_checkpoint`, answered by dgplug for diffusion-gemma files."""
    global _UNCHECKED
    if _architecture(gguf_checkpoint_path) != ARCH:
        return _ORIGINAL(gguf_checkpoint_path, return_tensors=return_tensors, model_to_load=model_to_load,
                         torch_dtype=torch_dtype, **kw)
    if _UNCHECKED:
        import warnings

        warnings.warn(f"dgplug: transformers {_UNCHECKED} is newer than the last release dgplug's GGUF loading was "
                      f"checked against ({'.'.join(map(str, MAX_VERSION))}); loading {gguf_checkpoint_path} "
                      "through it all the same (dgplug.load reads it without transformers)", stacklevel=2)
        _UNCHECKED = None
    from dgplug.converters.gguf_import import gguf_to_config, iter_hf_tensors, open_gguf

    reader = open_gguf(gguf_checkpoint_path, "c" if model_to_load is not None else "r")  # parsed once
    config = gguf_to_config(reader)
    gen = config.pop("generation_config")
    config.pop("mask_token_id", None)  # dgplug's own key; DiffusionGemmaConfig has no such field
    # not in a GGUF: a placeholder vision tower of one small layer (5.19 builds none and fails without
    # one). Its weights are random, as any tower's would be here; transformers' default (768 x 16) held
    # 168M random parameters (0.7 GB in fp32) for nothing. Images need the safetensors checkpoint.
    from dgplug.config import TINY_VISION

    config.setdefault("vision_config", dict(TINY_VISION))
    out = {"config": config, "tokenizer": {}, "tokenizer_config": {}}
    if return_tensors:
        tensors = iter_hf_tensors(reader, dtype=torch_dtype, packed=model_to_load is not None)
        if model_to_load is not None:
            out["tensors"] = pack_modules(model_to_load, tensors)
            _apply_generation_config(model_to_load, gen)
        else:
            out["tensors"] = dict(tensors)
    return out


# ---------------------------------------------------------------------------------------------
# Packed twins of transformers' modules
# ---------------------------------------------------------------------------------------------
def _module_classes():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from dgplug.integrations import hf_quantizer as H
    from dgplug.kernels.ggml import GGMLWeight

    class GGMLModule(nn.Module):
        """One packed GGUF weight: the blocks as a frozen uint8 parameter, `weight` a GGMLWeight over them."""

        def __init__(self, w: GGMLWeight):
            super().__init__()
            self.qtype, self.logical_shape, self.serve_dtype = w.qtype, tuple(w.shape), w.dtype
            self.blocks = nn.Parameter(torch.empty(w.blocks.shape, dtype=torch.uint8, device="meta"),
                                       requires_grad=False)

        @property
        def packed(self) -> GGMLWeight:
            return GGMLWeight(self.qtype, self.blocks, self.logical_shape, self.serve_dtype)

        weight = packed  # an expert stack: the MoE kernels read the blocks

        def extra_repr(self) -> str:
            return f"{self.qtype.name}, shape={list(self.logical_shape)}"

        def _apply(self, fn, recurse=True):
            """`.to(dtype)`, `.half()`, `.bfloat16()`: the blocks stay uint8, the dtype they serve
            follows, as a float weight's would (else the model's other weights move and these do not)."""
            super()._apply(fn, recurse)
            probe = fn(torch.zeros((), dtype=self.serve_dtype))
            if probe.is_floating_point():
                self.serve_dtype = probe.dtype
            return self

    class GGMLDense(GGMLModule):
        """A linear's weight or the embedding table: on CUDA (hf_quantizer._keep_dense) `weight` is
        the table dequantised once (one copy for the tied encoder, decoder and lm_head), as
        dgplug.load keeps it there: decoded per call, every step decodes every weight again;
        elsewhere the packed GGMLWeight, decoded per call."""

        def served(self, dtype) -> "torch.Tensor | GGMLWeight":
            w = self.packed
            if not H._keep_dense(self.blocks):
                H.drop_dense(self.blocks)
                return w  # F.linear decodes it in x's dtype
            return H.kept_dense(self.blocks, dtype, w.dequantize)

        @property
        def weight(self):
            return self.served(self.serve_dtype)

    class GGMLLinear(GGMLDense):
        def forward(self, x):
            return F.linear(x, self.served(x.dtype))

    class GGMLEmbedding(GGMLDense):
        def __init__(self, w: GGMLWeight, embed_scale: torch.Tensor):
            super().__init__(w)
            # a plain 0-dim CPU tensor, not a buffer: transformers re-creates non-persistent buffers
            # it did not load (as garbage); a CPU scalar still multiplies CUDA tensors
            self.embed_scale = embed_scale

        def forward(self, input_ids):
            w = self.weight
            return F.embedding(input_ids, w) * self.embed_scale.to(w.dtype)

    class GGMLExperts(nn.Module):
        def __init__(self, old: nn.Module):
            super().__init__()
            self.num_experts = old.num_experts
            self.gate_up_proj: nn.Module | None = None
            self.down_proj: nn.Module | None = None

        def forward(self, hidden_states, top_k_index, top_k_weights):
            from dgplug.kernels.moe import moe_forward

            return moe_forward(hidden_states, top_k_index, top_k_weights.float(), self.gate_up_proj.weight,
                               self.down_proj.weight)

    return GGMLModule, GGMLLinear, GGMLEmbedding, GGMLExperts


_ENCODER = "model.encoder.language_model."
_DECODER = "model.decoder."


def pack_modules(model, tensors) -> dict:
    """Swap the modules of a (meta) transformers DiffusionGemma whose weights come packed
    (kernels.ggml.GGMLWeight) for packed twins; returns the state dict to load: the packed
    weights' blocks under `<module>.blocks`, every other tensor as it came."""
    import re

    import torch

    GGMLModule, GGMLLinear, GGMLEmbedding, GGMLExperts = _module_classes()
    out, renamed = {}, {}
    modules = set(dict(model.named_modules()))
    # the checkpoint's names start with "model."; a bare DiffusionGemmaModel (AutoModel) is that
    # module itself, and transformers drops the prefix from the state dict's names for it
    prefix = "" if "model" in modules else "model."

    def at(path: str) -> str:  # a checkpoint name -> the name in `model`
        return path[len(prefix):] if prefix and path.startswith(prefix) else path

    def swap(path: str, new):
        parent, _, child = at(path).rpartition(".")
        model.get_submodule(parent)._modules[child] = new

    for name, t in tensors:
        if isinstance(t, torch.Tensor):
            out[name] = t
            continue
        paths = [name]
        if name.startswith(_DECODER + "layers.") or name == _DECODER + "embed_tokens.weight":
            twin = _ENCODER + name[len(_DECODER):]
            if at(twin.rsplit(".", 1)[0]) in modules:
                paths.append(twin)  # tied to the decoder's by transformers: same blocks
        if name.endswith("embed_tokens.weight"):
            scale = torch.tensor(model.get_submodule(at(name.rsplit(".", 1)[0])).scalar_embed_scale, device="cpu")
            for p in paths:
                swap(p.rsplit(".", 1)[0], GGMLEmbedding(t, scale))
            if hasattr(model, "lm_head"):  # the tied head reads the same table
                swap("lm_head", GGMLLinear(t))
                paths.append("lm_head.weight")
        elif re.search(r"\.experts\.(gate_up|down)_proj$", name):
            for p in paths:
                mod_path, _, which = p.rpartition(".")
                experts = model.get_submodule(at(mod_path))
                if not isinstance(experts, GGMLExperts):
                    experts = GGMLExperts(experts)
                    swap(mod_path, experts)
                setattr(experts, which, GGMLModule(t))
        else:
            for p in paths:
                swap(p.rsplit(".", 1)[0], GGMLLinear(t))
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        out[base + ".blocks"] = t.blocks
        for p in map(at, paths):
            renamed[p] = p.removesuffix(".weight") + ".blocks"
    _rewrite_ties(model, renamed)
    return out


def _rewrite_ties(model, renamed: dict) -> None:
    """Tie-map entries naming a swapped weight (X.weight, experts.gate_up_proj) -> its blocks."""
    for prefix, mod in model.named_modules():
        keys = getattr(mod, "all_tied_weights_keys", None)
        if not keys:
            continue
        pre = prefix + "." if prefix else ""
        new = {}
        for tgt, src in keys.items():
            t, s = renamed.get(pre + tgt), renamed.get(pre + src)
            if t is not None and s is not None:
                new[t[len(pre):]] = s[len(pre):]
            elif t is None and s is None:
                new[tgt] = src
            # one side packed, the other not (cannot happen for one file): the tie is dropped
        mod.all_tied_weights_keys = new


load_gguf_checkpoint._dgplug = True


def register() -> bool:
    """Hook diffusion-gemma into transformers' GGUF loading (idempotent). False where not supported:
    before 5.19, or a newer release whose `load_gguf_checkpoint` no longer takes `model_to_load`. A
    release newer than the last checked one is hooked all the same and warns at its first load."""
    global _ORIGINAL, _UNCHECKED
    import transformers

    version = transformers.__version__
    if not (supported_version(version) or _newer_than_checked(version)):
        return False
    from transformers import modeling_gguf_pytorch_utils as mg

    current = mg.load_gguf_checkpoint
    if getattr(current, "_dgplug", False):
        return True
    if not _takes_model_to_load(current):
        return False
    _UNCHECKED = None if supported_version(version) else version
    _ORIGINAL = current
    mg.load_gguf_checkpoint = load_gguf_checkpoint
    for name in _BINDERS:  # modules that imported the function by name (5.19) and are loaded already
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "load_gguf_checkpoint", None) is current:
            mod.load_gguf_checkpoint = load_gguf_checkpoint
    _hook_word_level_tokenizers()
    return True


def _hook_word_level_tokenizers() -> None:
    """`AutoTokenizer.from_pretrained(dir, gguf_file=...)` on a diffusion-gemma GGUF whose vocabulary has
    no merges (a WordLevel source, such as the embedded Sudoku model): transformers' gemma4 builder
    would read its tokens as sentencepiece pieces (every Sudoku cell became <unk> and digits), so
    dgplug's rebuild, the tokenizer `dgplug.load` gives, answers instead, BOS as the file says. A
    vocabulary with merges (Gemma's own) still goes to transformers' builder, which by its policy
    adds no BOS for gemma4 (the chat template writes it). transformers 5.24's layout; elsewhere
    nothing is hooked."""
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as tm
    except ImportError:
        return
    import transformers.integrations.gguf as pkg

    get, convert = tm.get_gguf_tokenizer, tm.convert_gguf_tokenizer
    if getattr(get, "_dgplug", False):
        return

    def get_gguf_tokenizer(gguf_path):
        architecture, tokenizer, config = get(gguf_path)
        if architecture == ARCH and not tokenizer.get("merges"):
            from dgplug.converters.gguf_import import _field, _reader

            tokenizer = dict(tokenizer, dgplug_path=str(gguf_path))
            config["add_bos_token"] = bool(_field(_reader(gguf_path), "tokenizer.ggml.add_bos_token"))
        return architecture, tokenizer, config

    def convert_gguf_tokenizer(architecture, tokenizer_dict):
        if "dgplug_path" not in tokenizer_dict:
            return convert(architecture, tokenizer_dict)
        from dgplug.converters.gguf_import import tokenizer_from_gguf

        return tokenizer_from_gguf(tokenizer_dict["dgplug_path"]).backend_tokenizer, {}

    get_gguf_tokenizer._dgplug = True
    for mod in (tm, pkg):  # the tokenizer base imports both names from the package at call time
        mod.get_gguf_tokenizer, mod.convert_gguf_tokenizer = get_gguf_tokenizer, convert_gguf_tokenizer
