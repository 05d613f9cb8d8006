"""Checkpoint directories. Loading never unpickles: tensors are safetensors, everything else JSON.

    <dir>/encoder/      BERT weights and config (save_pretrained, safetensors)
    <dir>/tokenizer/    the tokenizer (save_pretrained)
    <dir>/heads.safetensors   heads, soft-sharing layers, bigram embeddings and window features
    <dir>/ngrams.safetensors  token-id n-gram tables (when bigram embeddings or n-gram bags are used)
    <dir>/mtl.json      tasks (type, tag/label set, sharing), encoder window, format version
    <dir>/manifest.json size and sha256 of every file above, written last (tasks_mtl/manifest.py)

A stage that is running also keeps `<dir>.resume/`: a checkpoint as above plus state.safetensors and
state.json (optimizer, scheduler, sampler, batch order, RNG and loss-weighting state), in the same
manifest. Every save is atomic (written aside, fsynced, renamed). Loading checks the files against the
manifest, refuses a directory holding a pickle (a .bin/.pt/.pkl file), and refuses head weights that do
not fit the model they are loaded into.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks_mtl.config import TaskConfig
from tasks_mtl.manifest import replace_directory, verify_manifest, write_manifest

FORMAT_VERSION = 1
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}  # what torch.load would open


class CheckpointMismatchError(ValueError):
    """Saved head weights that do not fit the configured model (a changed shape, a missing or extra parameter)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint directory holds a file only a pickle loader reads."""


def save_checkpoint(model, tokenizer, out: Path, max_length: int, state: dict[str, Any] | None = None,
                    trained: list[str] | None = None) -> Path:
    """Write model + tokenizer (and a training `state`, for a resume save) into `out`: all into a sibling temp
    dir, flushed, checksummed in manifest.json, then renamed into place (tasks_mtl/manifest.py). `trained`: the
    tasks some stage has trained so far (mtl.json's `trained_tasks`; the other heads are as initialised)."""
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
    if trained is not None:
        meta["trained_tasks"] = sorted(trained)
    (tmp / "mtl.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1, sort_keys=True))
    if state is not None:
        save_state(state, tmp)
    write_manifest(tmp)
    return replace_directory(tmp, out)


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "mtl.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no mtl.json)")
    return json.loads(meta_file.read_text(encoding="utf-8"))


def load_checkpoint(path: Path, tasks: dict[str, TaskConfig] | None = None, device: str | torch.device = "cpu"):
    """Model and tokenizer from a checkpoint directory.

    `tasks` (the run's configuration) may differ from the saved ones when a later stage adds a task: its
    head starts fresh; a saved task the run dropped is ignored. A task in both must fit its saved weights
    exactly, else CheckpointMismatchError names it. Without `tasks`, the saved task set is used (prediction).
    Files that fail the manifest raise CorruptCheckpointError; a pickle file raises UnsafeCheckpointError.
    """
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    from tasks_mtl.model import MultiTaskModel

    hf_logging.disable_progress_bar()

    path = Path(path)
    refuse_pickles(path)
    verify_manifest(path)  # older checkpoints have no manifest: nothing to check them against
    meta = read_meta(path)
    saved = {n: TaskConfig.model_validate(t) for n, t in meta["tasks"].items()}
    bert = BertModel.from_pretrained(str(path / "encoder"), add_pooling_layer=False, local_files_only=True,
                                     use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    from tasks_mtl.ngrams import NgramTables

    model = MultiTaskModel(bert, tasks or saved, NgramTables.load(path), bigram_dim=meta.get("bigram_dim", 0),
                           bigram_zero_init=meta.get("bigram_zero_init", False), window_dim=meta.get("window_dim", 0))
    heads = load_file(str(path / "heads.safetensors"))
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("bert.")}
    problems = head_mismatches(own, heads, fresh=set(tasks or saved) - set(saved))
    if problems:
        raise CheckpointMismatchError(f"{path}: the saved heads do not fit this configuration:\n  "
                                      + "\n  ".join(problems))
    model.load_state_dict({k: v for k, v in heads.items() if k in own}, strict=False)
    return model.to(device), tokenizer, meta


def owner(key: str) -> str:
    """Who a head parameter belongs to: "task 'ner'" for heads.ner.* and private.ner.*, else its module."""
    parts = key.split(".")
    return f"task {parts[1]!r}" if parts[0] in ("heads", "private") and len(parts) > 1 else f"module {parts[0]!r}"


DEFAULTED_BUFFERS = ("own_weight",)  # buffers newer than some checkpoints: one missing keeps the module's default


def head_mismatches(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], fresh: set[str]) -> list[str]:
    """What keeps saved head weights from loading into `own` exactly. Parameters of a `fresh` task (one the
    checkpoint lacks) may be missing, and so may `DEFAULTED_BUFFERS`; saved parameters nothing in the model owns
    (a dropped task) are ignored."""
    owners = {owner(k) for k in own}
    problems = []
    for key in sorted(own.keys() & saved.keys()):
        if own[key].shape != saved[key].shape:
            problems.append(f"{owner(key)}: {key} is {tuple(saved[key].shape)} in the checkpoint but "
                            f"{tuple(own[key].shape)} in the model (its labels or settings changed)")
    fresh_owners = {f"task {t!r}" for t in fresh}
    for key in sorted(own.keys() - saved.keys()):
        if owner(key) not in fresh_owners and key.rsplit(".", 1)[-1] not in DEFAULTED_BUFFERS:
            problems.append(f"{owner(key)}: {key} is not in the checkpoint")
    for key in sorted(saved.keys() - own.keys()):
        if owner(key) in owners:
            problems.append(f"{owner(key)}: the checkpoint has {key}, the model does not")
    return problems


def refuse_pickles(path: Path) -> None:
    """Checkpoints are safetensors and JSON; a file that only a pickle loader reads is refused, not opened."""
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise UnsafeCheckpointError(f"{path}: holds pickle file(s) {found}; a checkpoint is safetensors and JSON "
                                    "only, and pickles are never loaded")


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
    """The training state `save_state` wrote, in this process's own memory. `load_file` maps the file copy-on-write,
    and an optimizer keeps the tensors it is given: every first write to a 4 KiB page of its moments would then copy
    that page in a fault. SparseAdam writes a few rows of its n-gram tables per step, so a resumed stage paid that
    on most steps (~7 ms each for the two moments of the 179,115 x 64 bigram table)."""
    tensors = {k: v.clone() for k, v in load_file(str(directory / "state.safetensors")).items()}
    return _join(json.loads((directory / "state.json").read_text()), tensors)
