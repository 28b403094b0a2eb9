"""`vllm serve DIR --load-format dgplug-gguf`: vLLM's own model loader machinery loading a GGUF into
dgplug's model class (CPU; the engine itself needs a GPU)."""

import subprocess
import sys

import pytest
import torch

from vllm_helpers import make_vllm_config, run_standalone as _run


@pytest.fixture(scope="module")
def gguf(vllm_dist):
    from dgplug.converters.gguf_export import export_gguf

    path = vllm_dist["tmp"] / "serve-src" / "m-Q4_K_M.gguf"
    path.parent.mkdir(exist_ok=True)
    export_gguf(vllm_dist["ckpt"], path, quant="Q4_K_M", progress=False, workers=1)
    return path


def _load(vc):
    """As vLLM's BaseModelLoader.load_model, minus its accelerator cache calls (no device here):
    the model built under vLLM's config, the load format's loader, vLLM's post-load processing."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    loader = get_model_loader(vc.load_config)
    with set_current_vllm_config(vc), set_default_torch_dtype(vc.model_config.dtype), torch.device("cpu"):
        loader.download_model(vc.model_config)
        model = initialize_model(vllm_config=vc, model_config=vc.model_config)
        loader.load_weights(model, vc.model_config)
        process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    return loader, model.eval()


def test_serving_dir_from_a_gguf_alone_loads_through_vllms_loader(vllm_dist, gguf, tmp_path):
    """The directory made from the GGUF alone: vLLM parses its config (dgplug's architecture, the
    diffusion hook's canvas), picks dgplug's loader for the load format, and the model it builds
    keeps the experts in ggml blocks and gives the logits of the same GGUF fully dequantised."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    from dgplug.converters.gguf_import import iter_hf_tensors
    from dgplug.integrations.vllm_gguf import prepare_serving_dir
    from dgplug.integrations.vllm_model import DGPlugDiffusionGemmaForBlockDiffusion
    from dgplug.kernels.ggml import GGMLWeight

    d = prepare_serving_dir(gguf, tmp_path / "serve")
    assert {"config.json", "generation_config.json", "m-Q4_K_M.gguf", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} == {p.name for p in d.iterdir()}
    assert (d / "m-Q4_K_M.gguf").resolve() == gguf.resolve()  # linked, not copied
    vc = make_vllm_config(d, load_format="dgplug-gguf")
    assert vc.model_config.architectures == ["DGPlugDiffusionGemmaForBlockDiffusion"]
    assert vc.diffusion_config.canvas_length == 16
    loader, model = _load(vc)
    assert type(loader).__name__ == "DGPlugGGUFLoader"
    experts = model.model.layers[0].experts
    assert isinstance(experts.gate_up_proj, GGMLWeight) and isinstance(experts.down_proj, GGMLWeight)

    ref_vc = make_vllm_config(d, load_format="dgplug-gguf")  # one config per model (layer names)
    with set_current_vllm_config(ref_vc), set_default_torch_dtype(ref_vc.model_config.dtype), torch.device("cpu"):
        ref = DGPlugDiffusionGemmaForBlockDiffusion(vllm_config=ref_vc)
        ref.load_weights(iter_hf_tensors(gguf, packed=False))
        process_weights_after_loading(ref, ref_vc.model_config, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 500, (10,), generator=g)
    canvas = torch.randint(0, model.tc.vocab_size, (model.canvas_length,), generator=g)
    a, b = _run(model.eval(), vc, ids, canvas), _run(ref.eval(), ref_vc, ids, canvas)
    assert a.shape[-1] == 512 and (a - b).abs().max().item() < 1e-4


def test_loader_errors_name_the_directory(vllm_dist, gguf, tmp_path, monkeypatch):
    from dgplug.converters import gguf_import
    from dgplug.integrations.vllm_gguf import find_gguf, prepare_serving_dir

    d = prepare_serving_dir(gguf, tmp_path / "two")
    (d / "other.gguf").symlink_to(gguf)
    with pytest.raises(ValueError, match=r"two: --load-format dgplug-gguf needs exactly one \.gguf file"):
        find_gguf(d)
    with pytest.raises(ValueError, match="takes the directory holding the .gguf"):
        find_gguf(gguf)
    with pytest.raises(FileExistsError, match="exists"):
        prepare_serving_dir(gguf, d)
    with pytest.raises(ValueError, match="holds"):  # would delete the GGUF it links to
        prepare_serving_dir(gguf, gguf.parent, overwrite=True)

    def broken(path):
        raise RuntimeError("tokenizer went wrong")

    monkeypatch.setattr(gguf_import, "tokenizer_from_gguf", broken)
    with pytest.raises(RuntimeError, match="tokenizer went wrong"):
        prepare_serving_dir(gguf, tmp_path / "new")
    with pytest.raises(RuntimeError, match="tokenizer went wrong"):
        prepare_serving_dir(gguf, d, overwrite=True)  # the old directory survives a failed replace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # no half-written or temporary directory
    assert (d / "other.gguf").is_symlink() and (d / "config.json").exists()
    monkeypatch.undo()
    prepare_serving_dir(gguf, d, overwrite=True)
    assert not (d / "other.gguf").exists() and find_gguf(d).resolve() == gguf.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]


def test_load_format_is_registered_when_vllms_loader_module_loads():
    """The plugin does not import vLLM's (heavy) model_loader module; the load format appears
    when vLLM imports it."""
    code = ("import sys\nfrom dgplug.integrations import vllm_plugin\nvllm_plugin.register()\n"
            "assert 'vllm.model_executor.model_loader' not in sys.modules\n"
            "from vllm.config.load import LoadConfig\n"
            "from vllm.model_executor.model_loader import get_model_loader\n"
            "print(type(get_model_loader(LoadConfig(load_format='dgplug-gguf'))).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("DGPlugGGUFLoader"), r.stderr[-2000:]


def test_command_line_helper(gguf, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dgplug.integrations.vllm_gguf", str(gguf), str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "vllm serve" in r.stdout and (tmp_path / "s" / "config.json").exists()
    r = subprocess.run([sys.executable, "-m", "dgplug.integrations.vllm_gguf", str(gguf), str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "exists" in r.stderr
