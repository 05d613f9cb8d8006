"""Checkpoint directories. Loading never unpickles: tensors are safetensors, everything else JSON.

    <dir>/encoder/      BERT weights and config (save_pretrained, safetensors)
    <dir>/tokenizer/    the tokenizer (save_pretrained)
    <dir>/heads.safetensors   heads, soft-sharing layers, bigram embeddings and window features
    <dir>/ngrams.safetensors  token-id n-gram tables (when bigram embeddings or n-gram bags are used)
    <dir>/mtl.json      tasks (type, tag/label set, sharing), encoder window, format version

A stage that is running also keeps `<dir>.resume/`: a checkpoint as above plus state.safetensors and
state.json (optimizer, scheduler, sampler, batch order, RNG and loss-weighting state).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks_mtl.config import TaskConfig

FORMAT_VERSION = 1


def save_checkpoint(model, tokenizer, out: Path, max_length: int) -> Path:
    """Write model + tokenizer into `out` (replaced atomically via a sibling temp dir)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.bert.save_pretrained(str(tmp / "encoder"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    heads = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("bert.")}
    save_file(heads, str(tmp / "heads.safetensors"))
    if model.ngrams is not None:
        model.ngrams.save(tmp)
    meta = {
        "format_version": FORMAT_VERSION,
        "max_length": max_length,
        "bigram_dim": model.bigram_dim,
        "bigram_zero_init": model.bigram_zero_init,
        "window_dim": model.window_dim,
        "tasks": {n: t.model_dump(mode="json") for n, t in model.task_cfgs.items()},
    }
    (tmp / "mtl.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "mtl.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no mtl.json)")
    return json.loads(meta_file.read_text(encoding="utf-8"))


def load_checkpoint(path: Path, tasks: dict[str, TaskConfig] | None = None, device: str | torch.device = "cpu"):
    """Model and tokenizer from a checkpoint directory.

    `tasks` (the run's configuration) may differ from the saved ones when a later stage adds a task: its
    head starts fresh. Without `tasks`, the saved task set is used (prediction).
    """
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    from tasks_mtl.model import MultiTaskModel

    hf_logging.disable_progress_bar()

    path = Path(path)
    meta = read_meta(path)
    saved = {n: TaskConfig.model_validate(t) for n, t in meta["tasks"].items()}
    bert = BertModel.from_pretrained(str(path / "encoder"), add_pooling_layer=False, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    from tasks_mtl.ngrams import NgramTables

    model = MultiTaskModel(bert, tasks or saved, NgramTables.load(path), bigram_dim=meta.get("bigram_dim", 0),
                           bigram_zero_init=meta.get("bigram_zero_init", False), window_dim=meta.get("window_dim", 0))
    heads = load_file(str(path / "heads.safetensors"))
    own = model.state_dict()
    usable = {k: v for k, v in heads.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return model.to(device), tokenizer, meta


# ---- flat state: nested dicts/lists of tensors and JSON values <-> (safetensors, JSON) -------------

def _split(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_split(k, f"{prefix}.k{i}", tensors), _split(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_state(state: dict[str, Any], directory: Path) -> None:
    """Save a nested training state (optimizer, RNG, ...) as state.safetensors + state.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "s", tensors)
    save_file(tensors, str(directory / "state.safetensors"))
    (directory / "state.json").write_text(json.dumps(skeleton))


def load_state(directory: Path) -> dict[str, Any]:
    tensors = load_file(str(directory / "state.safetensors"))
    return _join(json.loads((directory / "state.json").read_text()), tensors)
