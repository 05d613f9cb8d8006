"""What load_checkpoint refuses (changed heads, pickles, files that fail their checksum) and what it accepts
(a task the checkpoint lacks, a task the run dropped); saves are all-or-nothing. No training: a fresh model
of the tiny project is saved and loaded."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from tiny_project import REPO_ROOT

from tasks_mtl.checkpoint import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from tasks_mtl.manifest import MANIFEST, CorruptCheckpointError


def _fresh_model(cfg, tasks=None):
    from tasks_mtl.model import new_model
    from tasks_mtl.ngrams import NgramTables
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

    tokenized = cfg.path(cfg.data.tokenized_dir)
    tokenizer = load_tokenizer(tokenized / TOKENIZER_DIR)
    torch.manual_seed(0)
    if tasks is not None:
        cfg = cfg.model_copy(update={"tasks": tasks})
    return new_model(cfg, tokenizer, NgramTables.load(tokenized)), tokenizer


def _saved(cfg, out, tasks=None):
    model, tokenizer = _fresh_model(cfg, tasks)
    save_checkpoint(model, tokenizer, out, cfg.encoder.max_length)
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_head_whose_shape_changed_is_an_error_naming_the_task_and_parameter(tiny_tokenized, tmp_path):
    cfg = tiny_tokenized
    _saved(cfg, tmp_path / "ckpt")
    tasks = dict(cfg.tasks)
    tasks["ner"] = tasks["ner"].model_copy(update={"labels": ["PER", "LOC", "ORG", "TIME"]})  # 7 -> 9 tags
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(tmp_path / "ckpt", tasks)
    message = str(err.value)
    assert "task 'ner'" in message and "heads.ner.emit.weight" in message and "(7, 32)" in message
    assert "sentiment" not in message and "cws" not in message  # only what is wrong is named


def test_a_saved_task_whose_head_gained_a_layer_is_an_error(tiny_tokenized, tmp_path):
    cfg = tiny_tokenized
    _saved(cfg, tmp_path / "ckpt")
    tasks = dict(cfg.tasks)
    tasks["cws"] = tasks["cws"].model_copy(update={"crf": True})  # a CRF the checkpoint never trained
    with pytest.raises(CheckpointMismatchError, match=r"task 'cws': heads\.cws\.crf\.\S+ is not in the "):
        load_checkpoint(tmp_path / "ckpt", tasks)


def test_a_task_the_checkpoint_lacks_starts_fresh_and_a_dropped_task_is_ignored(tiny_tokenized, tmp_path):
    cfg = tiny_tokenized
    without_nsp = {n: t for n, t in cfg.tasks.items() if n != "nsp"}
    saved = _state(_saved(cfg, tmp_path / "ckpt", without_nsp))
    model, _, _ = load_checkpoint(tmp_path / "ckpt", cfg.tasks)  # a later stage adds nsp
    loaded = _state(model)
    assert any(k.startswith("heads.nsp.") for k in loaded)
    assert not any(k.startswith("heads.nsp.") for k in saved)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())  # everything saved came back exactly

    full = _state(_saved(cfg, tmp_path / "full"))
    fewer = {n: t for n, t in cfg.tasks.items() if n != "sentiment"}
    model, _, _ = load_checkpoint(tmp_path / "full", fewer)  # the run dropped sentiment
    loaded = _state(model)
    assert not any(k.startswith("heads.sentiment.") for k in loaded)
    assert all(torch.equal(v, full[k]) for k, v in loaded.items())


def _pickle_payload(path: pathlib.Path, marker: pathlib.Path) -> None:
    class RunsCodeOnLoad:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    torch.save({"embeddings.word_embeddings.weight": RunsCodeOnLoad()}, path)


@pytest.mark.parametrize("keep_safetensors", [True, False])
def test_a_checkpoint_holding_a_pickle_is_refused_unopened(tiny_tokenized, tmp_path, keep_safetensors):
    cfg = tiny_tokenized
    _saved(cfg, tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    _pickle_payload(tmp_path / "ckpt" / "encoder" / "pytorch_model.bin", marker)
    if not keep_safetensors:
        (tmp_path / "ckpt" / "encoder" / "model.safetensors").unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"encoder/pytorch_model\.bin"):
        load_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    calls = []
    for folder in ("tasks_mtl", "flows", "benchmarks"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for match in re.finditer(r"torch\.load\(", text):
                call = text[match.start(): text.find(")", match.start()) + 1]
                calls.append((path.relative_to(REPO_ROOT).as_posix(), call))
    assert all("weights_only=True" in call for _, call in calls), calls
    # the one deliberate weights_only=False is the test that shows what it would run
    allowed = REPO_ROOT / "tests" / "flows" / "test_pretrained.py"
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        unsafe = re.findall(r"torch\.load\([^)]*weights_only=False", text)
        assert not unsafe or path == allowed, (path, unsafe)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_file_that_fails_its_checksum_is_never_loaded(tiny_tokenized, tmp_path, damage):
    cfg = tiny_tokenized
    _saved(cfg, tmp_path / "ckpt")
    listed = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())["files"]  # every file, checksummed
    assert {"heads.safetensors", "encoder/model.safetensors", "mtl.json", "tokenizer/tokenizer.json"} <= set(
        listed)
    target = tmp_path / "ckpt" / "heads.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte of a tensor changed
        target.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        target.unlink()
    with pytest.raises(CorruptCheckpointError, match="heads.safetensors"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_whole(tiny_tokenized, tmp_path, monkeypatch):
    import tasks_mtl.checkpoint as checkpoint

    cfg = tiny_tokenized
    before = _state(_saved(cfg, tmp_path / "ckpt"))
    model, tokenizer = _fresh_model(cfg)
    with torch.no_grad():
        model.heads["ner"].emit.weight.add_(1.0)

    def dies(directory):  # the process "dies" after the files are written, before the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_manifest", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt", cfg.encoder.max_length)
    monkeypatch.undo()
    loaded = _state(load_checkpoint(tmp_path / "ckpt")[0])
    assert all(torch.equal(loaded[k], v) for k, v in before.items())
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", cfg.encoder.max_length)  # the next save replaces it
    again = load_checkpoint(tmp_path / "ckpt")[0]
    assert torch.equal(again.heads["ner"].emit.weight, model.heads["ner"].emit.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp or .old left behind


def test_a_loaded_training_state_is_private_memory_not_a_view_of_the_file(tmp_path):
    """An optimizer keeps the state tensors it is given. Mapped from the file, every first write to a page of them
    copied that page in a fault (a resumed stage's SparseAdam paid it on most steps); a view of the file would
    also change when the file does. Rewriting the file's bytes after loading must leave the loaded state alone."""
    from tasks_mtl.checkpoint import load_state, save_state

    moment = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    save_state({"optimizer": [{"state": {"0": {"exp_avg": moment}}}], "step": 7}, tmp_path)
    loaded = load_state(tmp_path)
    exp_avg = loaded["optimizer"][0]["state"]["0"]["exp_avg"]
    assert loaded["step"] == 7 and torch.equal(exp_avg, moment)

    path = tmp_path / "state.safetensors"
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, then the tensors
    ((begin, end),) = [v["data_offsets"] for k, v in json.loads(data[8:8 + header]).items() if k != "__metadata__"]
    assert end - begin == moment.numel() * 4
    with path.open("r+b") as raw:  # the same file, rewritten in place: -1.0 in every element
        raw.seek(8 + header + begin)
        raw.write(torch.full((64, 64), -1.0).numpy().tobytes())
    assert torch.equal(exp_avg, moment), "the loaded state follows the file: it is a mapping of it"
    exp_avg.add_(1.0)  # and it is writable, as an optimizer's moment must be
    assert torch.equal(exp_avg, moment + 1.0)
