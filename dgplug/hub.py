"""Hugging Face hub ids ("owner/name") wherever dgplug takes a checkpoint path.

`resolve(name_or_path)` returns an existing local path unchanged; an "owner/name" id is fetched
through huggingface_hub into its own cache (or found there) and the snapshot directory returned:

    dgplug.load("google/diffusiongemma-26B-A4B-it")          # config, tokenizer, safetensors shards
    dgplug.load("owner/name-GGUF", gguf_file="model-Q4_K_M.gguf")   # one .gguf file by name

As transformers does: `revision` (branch, tag or commit; default "main"), `token` (None: the
HF_TOKEN variable or the stored login), the cache of huggingface_hub (HF_HUB_CACHE / HF_HOME,
or `cache_dir`), and HF_HUB_OFFLINE=1 (cache only; nothing is downloaded). Only the files a
DiffusionGemma needs are downloaded (`FILES`), never the whole repository.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

# config, generation config, tokenizer and chat template, the safetensors shards and their index
FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "chat_template.jinja",
         "chat_template.json", "*.safetensors", "*.safetensors.index.json"]


def is_hub_id(name) -> bool:
    """'owner/name' that is not an existing local path and is a valid repository id."""
    s = str(name)
    if Path(s).exists() or s.count("/") != 1 or s.startswith((".", "~")) or s.endswith((".gguf", ".json")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def resolve(name_or_path, *, revision: str | None = None, token: str | bool | None = None,
            cache_dir: str | Path | None = None, gguf_file: str | None = None,
            files: list[str] | None = None) -> Path:
    """A local path (returned as is), or the local copy of hub id `name_or_path`.

    gguf_file: download that one file of the repository and return its path (instead of the
    snapshot directory with FILES); files: other patterns than FILES (e.g. ["config.json"])."""
    if not is_hub_id(name_or_path):
        path = Path(name_or_path)
        if gguf_file is not None and path.is_dir():
            path = path / gguf_file
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        return path
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo = str(name_or_path)
    at = f"{repo}@{revision}" if revision else repo
    kw = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=constants.HF_HUB_OFFLINE)
    try:
        if gguf_file is not None:
            return Path(hf_hub_download(repo, gguf_file, **kw))
        return Path(snapshot_download(repo, allow_patterns=files or FILES, **kw))
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        what = f"{at}{f' file {gguf_file}' if gguf_file else ''}: no such local path, and not in the Hugging Face " \
               f"cache ({where})"
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"{what}; HF_HUB_OFFLINE=1 forbids downloading it") from None
        raise CheckpointError(f"{what}; the hub cannot be reached") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{at}: no revision {revision!r} on the hub") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{at}: the repository has no file {gguf_file!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{at}: no such repository on the hub (or it is private or gated: pass a token "
                              "or log in with `hf auth login`)") from None
