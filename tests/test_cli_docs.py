"""What the README and examples tell people (issue 14, item 11): install lines that can work, and
claims that match the shipped files and the code."""

import json
import re
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUDOKU = ROOT / "dgplug" / "data" / "sudoku"
DTYPE_WORDS = {"F32": ("float32", "fp32"), "BF16": ("bfloat16", "bf16"), "F16": ("float16", "fp16")}
FROM_INDEX = re.compile(r"pip install[^\n#]*?(?<![\w./-])['\"]?dgplug(\[[^\]]*\])?(?![\w./-])")


@pytest.mark.parametrize("name", ["README.md", "examples/serve_vllm.sh"])
def test_no_install_from_the_index(name):
    """dgplug is not on PyPI: `pip install 'dgplug[vllm]'` cannot work; checkout or wheel lines can."""
    text = (ROOT / name).read_text()
    bad = [m.group(0) for m in FROM_INDEX.finditer(text)]
    assert not bad, bad
    assert FROM_INDEX.search("pip install 'dgplug[vllm]'") and not FROM_INDEX.search(
        "pip install './dist/dgplug-0.1.0-py3-none-any.whl[vllm]'")


def _sudoku_dtypes():
    with open(SUDOKU / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return {v["dtype"] for v in hdr.values()}


@pytest.mark.skipif(not (SUDOKU / "model.safetensors").exists(), reason="no Sudoku package data")
def test_sudoku_size_and_dtype_as_shipped():
    m = re.search(r"`dgplug/data/sudoku`, ([\d.]+) MB of (\w+) weights", (ROOT / "README.md").read_text())
    assert m, "the README should state the embedded model's size and dtype"
    size = sum(f.stat().st_size for f in SUDOKU.glob("*.safetensors"))
    assert float(m.group(1)) == round(size / 1e6, 1), (m.group(1), size)
    (dtype,) = _sudoku_dtypes()
    assert m.group(2) in DTYPE_WORDS[dtype], (m.group(2), dtype)
    import dgplug.assets

    wrong = [w for d, words in DTYPE_WORDS.items() if d != dtype for w in words if w in dgplug.assets.__doc__]
    assert not wrong, f"dgplug/assets.py's docstring calls the {dtype} weights {wrong}"


def test_f32_gguf_claim():
    """An F32 GGUF has the same weights bit for bit, not bit-identical logits (alignment)."""
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "bit-identical logits" not in text and "same weights bit for bit" in text


@pytest.mark.skipif(not (SUDOKU / "config.json").exists(), reason="no Sudoku package data")
def test_serve_script_takes_the_models_canvas_and_context(tmp_path):
    """examples/serve_vllm.sh on the embedded model: canvas 82 and context 512 from its config (it
    passed canvas 256 and --max-model-len 8192, which vLLM refuses above max_position_embeddings);
    MAX_LEN still overrides. A stand-in `vllm` prints the command it was given."""
    import os
    import subprocess

    fake = tmp_path / "vllm"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def args(**extra):
        p = subprocess.run(["bash", str(ROOT / "examples" / "serve_vllm.sh"), str(SUDOKU)], capture_output=True,
                           text=True, env=dict(env, **extra), timeout=60)
        assert p.returncode == 0, p.stderr
        a = p.stdout.splitlines()
        return {k: a[a.index(k) + 1] for k in ("--diffusion-config", "--max-model-len")}

    got = args()
    assert json.loads(got["--diffusion-config"]) == {"canvas_length": 82} and got["--max-model-len"] == "512"
    assert args(MAX_LEN="300")["--max-model-len"] == "300"


def test_every_setting_is_documented():
    """Each DGPLUG_* variable the code reads and each visible option of each command is named in the
    README (three variables and five options were found missing by a review)."""
    import typer

    from dgplug.cli import app

    readme = (ROOT / "README.md").read_text()
    code = "".join(p.read_text() for d in ("dgplug",)
                   for p in sorted((ROOT / d).rglob("*.py")))
    variables = set(re.findall(r"DGPLUG_[A-Z0-9_]*[A-Z0-9]", code))
    assert {"DGPLUG_THREADS", "DGPLUG_KERNELS", "DGPLUG_CACHE"} <= variables
    assert sorted(v for v in variables if v not in readme) == []
    missing = [f"{name} {o}" for name, cmd in typer.main.get_command(app).commands.items()
               for p in cmd.params if not getattr(p, "hidden", False)
               for o in p.opts + p.secondary_opts if o.startswith("--") and o not in readme]
    assert missing == []


def test_every_gguf_file_type_is_documented():
    """convert --quant's help, the README's command line and its GGUF paragraph name every file type
    of the recipe table and llama-quantize's aliases, and no type the converter refuses."""
    import typer

    from dgplug.cli import app
    from dgplug.converters.gguf_export import ALIASES, FILE_TYPES

    readme = (ROOT / "README.md").read_text()
    line = readme[readme.index("dgplug convert SRC OUT --quant TYPE"):readme.index("dgplug inspect FILE.gguf")]
    para = readme[readme.index("- **GGUF** (`OUT.gguf`;"):readme.index("- **Quantized safetensors**")]
    quant = next(p for p in typer.main.get_command(app).commands["convert"].params if p.name == "quant")
    names = re.compile(r"\b(?:I?Q\d_[0-9A-Z_]+|Q\d_K|[BF]F?\d\d)\b")
    for where, text in (("--quant help", quant.help), ("README command line", line), ("README GGUF paragraph", para)):
        found = set(names.findall(text))
        assert set(FILE_TYPES) | set(ALIASES) <= found, (where, sorted((set(FILE_TYPES) | set(ALIASES)) - found))
        assert found <= set(FILE_TYPES) | set(ALIASES) | {"IQ4_XS", "IQ4_NL"}, (where, sorted(found))


def test_every_switch_is_read_through_the_table():
    """The DGPLUG_* switches are read through dgplug.settings (one table of values and defaults), so a
    typo is an error, not the default without a word. Every read of the environment in the package
    names its variable: another program's (HF_*, TRITON_*, ...), or one of the three DGPLUG_* variables
    with their own readers (threads through the name dgplug.threads.ENV, cache path, MoE tiles);
    the imatrix sets and restores DGPLUG_CUDA_GRAPHS around its run (a write)."""
    from dgplug import settings

    reads = []
    for d in ("dgplug",):
        for p in sorted((ROOT / d).rglob("*.py")):
            if p.name == "settings.py":
                continue
            for arg in re.findall(r"(?:environ\.get|environ\.pop|getenv)\(\s*([^,)]+)|environ\[\s*([^\]]+)\]", p.read_text()):
                reads.append((p.name, (arg[0] or arg[1]).strip()))
    dgplug_reads = {(f, a) for f, a in reads if "DGPLUG" in a or not a.startswith(("\"", "'"))}
    assert dgplug_reads <= {("threads.py", "ENV"), ("common.py", "ENV"), ("common.py", "threads.ENV"),
                            ("assets.py", '"DGPLUG_CACHE"'), ("moe.py", '"DGPLUG_MOE_CONFIG"'),
                            ("common.py", '"DGPLUG_MOE_CONFIG"'), ("imatrix.py", '"DGPLUG_CUDA_GRAPHS"'),
                            ("gguf_export.py", "k")}, dgplug_reads
    code = "".join(p.read_text() for d in ("dgplug",)
                   for p in sorted((ROOT / d).rglob("*.py")))
    named = set(re.findall(r"DGPLUG_[A-Z0-9_]*[A-Z0-9]", code)) - {"DGPLUG_THREADS", "DGPLUG_CACHE", "DGPLUG_MOE_CONFIG"}
    assert named == set(settings.SWITCHES), named ^ set(settings.SWITCHES)


def test_a_bad_switch_is_one_line_before_any_work(monkeypatch):
    """A value a switch does not take is one error line naming it, for any command, before the model
    loads; true/false, yes/no, on/off are read as 1/0."""
    from dgplug import settings
    from dgplug.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    for name, (default, values) in settings.SWITCHES.items():
        monkeypatch.setenv(name, "bogus")
        r = runner.invoke(app, ["info", "sudoku"])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 1 and lines == [f"error: {name}='bogus': use {', '.join(values[:-1])} or {values[-1]}"
                                               + (" (or true/false, yes/no, on/off)" if "1" in values else "")], r.output
        if "1" in values:
            for spelling, want in (("false", "0"), ("Off", "0"), ("yes", "1"), (" TRUE ", "1")):
                monkeypatch.setenv(name, spelling)
                assert settings.switch(name) == want
        monkeypatch.delenv(name)
        assert settings.switch(name) == default
    monkeypatch.setenv("DGPLUG_MOE_CONFIG", "garbage")
    r = runner.invoke(app, ["info", "sudoku"])
    assert r.exit_code == 1 and "DGPLUG_MOE_CONFIG='garbage': 'garbage' is not KEY=integer" in r.output, r.output
