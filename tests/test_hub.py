"""Hub ids ("owner/name") in dgplug.load and the converters, offline, against a huggingface_hub cache
laid out in a temporary directory (models--owner--name/{blobs, refs, snapshots/<commit>}).

Nothing touches the network: HF_HUB_OFFLINE=1 (conftest) and the cache is the only source.
"""

import hashlib
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch

import dgplug
from dgplug import hub
from dgplug.errors import CheckpointError
from dgplug.testing import make_checkpoint, probe_logits

REPO = "tiny-org/dg-tiny"


def put_in_cache(cache: Path, repo: str, files: Path, ref: str = "main") -> str:
    """Lay out `files` as huggingface_hub's cache holds a downloaded revision; returns its commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}@{ref}:{files}".encode()).hexdigest()
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty hub cache used by huggingface_hub (and so by transformers) for this test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    return cache


def test_load_by_id_equals_load_by_path(tiny_ckpt, hf_cache):
    commit = put_in_cache(hf_cache, REPO, tiny_ckpt)
    info = huggingface_hub.scan_cache_dir(hf_cache)  # huggingface_hub reads the layout as its own
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {commit} and not info.warnings

    by_id, by_path = dgplug.load(REPO), dgplug.load(tiny_ckpt)
    assert torch.equal(probe_logits(by_id), probe_logits(by_path))
    assert by_id.source == REPO and by_id.tokenizer is not None
    assert by_id.generation_defaults == by_path.generation_defaults

    from transformers import DiffusionGemmaForBlockDiffusion  # transformers resolves the id to the same files

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(REPO).eval()
    assert (probe_logits(hf) - probe_logits(by_id)).abs().max().item() < 1e-5


def test_revision_branch_and_commit(tiny_ckpt, hf_cache, tmp_path):
    other = make_checkpoint(tmp_path / "v2", seed=3)
    put_in_cache(hf_cache, REPO, tiny_ckpt)
    commit = put_in_cache(hf_cache, REPO, other, ref="v2")
    assert hub.resolve(REPO, revision="v2").name == commit
    assert hub.resolve(REPO, revision=commit) == hub.resolve(REPO, revision="v2")
    want = probe_logits(dgplug.load(other))
    assert torch.equal(probe_logits(dgplug.load(REPO, revision="v2")), want)
    assert not torch.equal(probe_logits(dgplug.load(REPO)), want)


def test_offline_and_not_cached_is_one_clear_line(hf_cache):
    with pytest.raises(CheckpointError) as e:
        dgplug.load("someone/not-downloaded")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("someone/not-downloaded:") and "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(CheckpointError, match="^tiny-org/dg-tiny@v9:"):
        hub.resolve(REPO, revision="v9")


def test_local_paths_unchanged(tiny_ckpt, tmp_path):
    assert hub.resolve(tiny_ckpt) == tiny_ckpt and hub.resolve(str(tiny_ckpt)) == tiny_ckpt
    with pytest.raises(CheckpointError, match="no such file or directory"):
        hub.resolve(tmp_path / "missing")
    assert not hub.is_hub_id("./a/b") and not hub.is_hub_id("a/b/c") and hub.is_hub_id("google/diffusiongemma-26B-A4B-it")


def test_downloads_only_what_a_model_needs(monkeypatch):
    """The arguments go to huggingface_hub as transformers passes them; its own filter keeps the
    config, generation config, tokenizer, chat template and safetensors shards of a repository
    laid out as the release is, and nothing else."""
    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: seen.update(kw, repo=repo) or "/x")
    assert hub.resolve("google/diffusiongemma-26B-A4B-it", revision="abc", token="hf_t") == Path("/x")
    assert seen["repo"] == "google/diffusiongemma-26B-A4B-it" and seen["revision"] == "abc"
    assert seen["token"] == "hf_t" and seen["cache_dir"] is None and seen["local_files_only"] is True
    listing = ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "processor_config.json", "README.md", ".gitattributes",
               "assets/diagram.png", "original/consolidated.pth"] + \
              [f"model-{i:05d}-of-00012.safetensors" for i in range(1, 13)]
    kept = set(huggingface_hub.utils.filter_repo_objects(listing, allow_patterns=seen["allow_patterns"]))
    assert kept == set(listing) - {"processor_config.json", "README.md", ".gitattributes", "assets/diagram.png",
                                   "original/consolidated.pth"}


def test_gguf_file_by_name(tiny_ckpt, hf_cache, tmp_path):
    from dgplug.converters.gguf_export import export_gguf

    files = tmp_path / "gguf-repo"
    files.mkdir()
    gguf = export_gguf(tiny_ckpt, files / "dg-tiny-F32.gguf", quant="F32", progress=False)
    put_in_cache(hf_cache, "tiny-org/dg-tiny-GGUF", files)
    m = dgplug.load("tiny-org/dg-tiny-GGUF", gguf_file="dg-tiny-F32.gguf")
    assert torch.equal(probe_logits(m), probe_logits(dgplug.load(gguf)))
    assert m.source == "tiny-org/dg-tiny-GGUF/dg-tiny-F32.gguf"
    with pytest.raises(CheckpointError, match="file dg-tiny-Q4_0.gguf"):
        dgplug.load("tiny-org/dg-tiny-GGUF", gguf_file="dg-tiny-Q4_0.gguf")


def test_converters_take_ids(tiny_ckpt, hf_cache, tmp_path):
    from dgplug.converters.gguf_export import export_gguf
    from dgplug.converters.quant import quantize_checkpoint

    put_in_cache(hf_cache, REPO, tiny_ckpt)
    a = export_gguf(REPO, tmp_path / "a.gguf", quant="Q8_0", progress=False, name="n")
    b = export_gguf(tiny_ckpt, tmp_path / "b.gguf", quant="Q8_0", progress=False, name="n")
    assert a.read_bytes() == b.read_bytes()
    from gguf import GGUFReader

    c = export_gguf(REPO, tmp_path / "c.gguf", quant="F16", progress=False)
    # named from the repository's name by gguf-py's heuristics, as a local directory named dg-tiny
    # would be (not from the snapshot directory, a commit hash)
    fields = GGUFReader(c).fields
    assert fields["general.name"].contents() == "Dg Tiny" and "general.finetune" not in fields
    qa = quantize_checkpoint(REPO, tmp_path / "qa", "int8", progress=False)
    qb = quantize_checkpoint(tiny_ckpt, tmp_path / "qb", "int8", progress=False)
    assert sorted(p.name for p in qa.iterdir()) == sorted(p.name for p in qb.iterdir())
    for p in qa.iterdir():
        assert p.read_bytes() == (qb / p.name).read_bytes(), p.name


def test_cli_info_takes_an_id(tiny_ckpt, hf_cache):
    """`dgplug info owner/name`: the architecture from the cached config.json (as `generate` and
    `convert` take ids); not cached and offline: the hub's one line, not "no config.json"."""
    import json

    from typer.testing import CliRunner

    from dgplug.cli import app

    put_in_cache(hf_cache, REPO, tiny_ckpt)
    by_id = CliRunner().invoke(app, ["info", REPO, "--json"])
    by_path = CliRunner().invoke(app, ["info", str(tiny_ckpt), "--json"])
    assert by_id.exit_code == 0 and by_path.exit_code == 0, by_id.output
    got, want = json.loads(by_id.stdout), json.loads(by_path.stdout)
    assert got["path"] == REPO and got["params_total"] == want["params_total"] > 0
    assert {k: got[k] for k in ("layers", "layer_pattern", "experts", "top_k")} == {k: want[k] for k in ("layers", "layer_pattern", "experts", "top_k")}
    table = CliRunner().invoke(app, ["info", REPO])
    assert table.exit_code == 0 and "hub id (config.json only" in table.stdout and "on disk" not in table.stdout
    r = CliRunner().invoke(app, ["info", "someone/not-downloaded"])
    assert r.exit_code == 1 and "HF_HUB_OFFLINE=1 forbids downloading it" in r.stderr and "config.json" not in r.stderr


def test_cli_downloads_an_id_unless_offline(tiny_ckpt, tmp_path):
    """The command line leaves HF_HUB_OFFLINE to the user, as transformers does: without it a hub id
    is downloaded (it once defaulted to offline, so `dgplug convert owner/name` could only read the
    cache); with HF_HUB_OFFLINE=1 only the cache is read. huggingface_hub's download is replaced,
    in a fresh process: nothing reaches the network."""
    import subprocess
    import sys

    code = (
        "import sys, huggingface_hub\n"
        "seen = []\n"
        "huggingface_hub.snapshot_download = lambda repo, **kw: seen.append(kw['local_files_only']) or sys.argv[1]\n"
        "from typer.testing import CliRunner\n"
        "from dgplug.cli import app\n"
        "r = CliRunner().invoke(app, ['info', 'owner/model', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(seen)\n")
    for offline, want in ((None, "[False]"), ("1", "[True]")):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        if offline:
            env["HF_HUB_OFFLINE"] = offline
        env["HF_HUB_CACHE"] = str(tmp_path / "hub")
        r = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt)], env=env, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == want, (offline, r.stdout, r.stderr[-2000:])
