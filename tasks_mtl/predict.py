"""Prediction: `Predictor.from_dir(path).predict(texts)` returns the records of the contract.

Long inputs never crash: classification averages the class probabilities of overlapping windows;
token tasks take each character's emissions from the window where it sits farthest from an edge
(tasks_mtl.windows), then decode the whole text at once (argmax, or Viterbi when the head has a CRF). Tasks that cut
the text into words (cws, pos) read each other's word boundaries before their Viterbi (`boundary_evidence`, tasks_mtl.boundaries).
`mtl predict`'s JSONL files: tasks_mtl.predict_jsonl.

Speed: everything runs under `torch.inference_mode`; texts are batched by length through the project's one
length-batching helper (`sampling.length_batches`). One encoder pass serves every token task and the sentence
classifiers: a text whose own encoding is the per-character one (most Chinese text) is classified from its token
row, any other that fits a window from a row of its own encoding added to the same pass. The encoder's layers
run in bf16 where the hardware does bf16 natively (`precision`); on the default model that changed no test metric
by more than 0.0006 and made evaluation 1.8x faster. At inference they run through tasks_mtl.fast_encoder (the
same numbers as transformers' layers, less overhead); the CRFs' Viterbi and forward-backward are compiled
(tasks_mtl.chain). `quantize=True` swaps the Linear layers for dynamic int8 ones (weights int8, activations
quantised per batch) for CPU serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks_mtl import boundaries, windows
from tasks_mtl.checkpoint import load_checkpoint
from tasks_mtl.model import bf16_fast
from tasks_mtl.quantize import quantize_linear
from tasks_mtl.sampling import length_batches
from tasks_mtl.spans import lenient_spans, render_tokens

PRECISIONS = ("auto", "bf16", "fp32")
STRIDE = 32  # tokens of overlap between windows (at most a quarter of the window): context at the edges


class PredictionInputError(ValueError):
    """A prediction request that cannot be served (missing or non-string text, bad JSON line)."""


class Predictor:
    """`precision`: "auto" runs the encoder's layers in bf16 where the device does bf16 fast (`bf16_fast`: an
    avx512_bf16 or AMX CPU, a bf16 GPU) and in fp32 elsewhere; "bf16" and "fp32" force one. Embeddings, n-gram
    parts and heads (with the CRF) always run in fp32."""

    def __init__(self, model, tokenizer, meta: dict, device: torch.device, batch_size: int = 32,
                 precision: str = "auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
        self.model, self.tokenizer, self.meta, self.device = model.eval(), tokenizer, meta, device
        self.batch_size = batch_size
        self.window = min(meta["max_length"], model.bert.config.max_position_embeddings)
        self.stride = min(STRIDE, self.window // 4)
        self.tasks = model.task_cfgs
        self.trained = set(meta.get("trained_tasks") or self.tasks)  # checkpoints before the key: every head
        quantized = any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
        if quantized and precision == "bf16":
            raise ValueError("precision bf16 and int8 Linear layers (quantize) exclude each other")
        bf16 = precision == "bf16" or precision == "auto" and not quantized and bf16_fast(device)
        if bf16:
            model.layers_to(torch.bfloat16)
        self.precision = "int8" if quantized else "bf16" if bf16 else "fp32"

    @classmethod
    def from_dir(cls, path: Path | str, device: str | None = None, batch_size: int = 32,
                 quantize: bool = False, precision: str = "auto") -> Predictor:
        """Load a checkpoint directory; `quantize`: dynamic int8 Linear layers (CPU only, see `quantize_linear`)."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not quantize else "cpu"))
        model, tokenizer, meta = load_checkpoint(Path(path), device=dev)
        if quantize:
            model = quantize_linear(model)
        return cls(model, tokenizer, meta, dev, batch_size, precision)

    # -- raw outputs --------------------------------------------------------------------------------

    def hidden(self, tasks: list[str], batch: dict) -> dict[str, torch.Tensor]:
        """The fp32 hidden states (B, T, H) each task's head reads, from one encoder pass."""
        states = self.model.tasks_hidden(tasks, batch)
        cast = {id(h): h.float() for h in states.values()}  # tasks reading the same layer share one cast
        return {task: cast[id(h)] for task, h in states.items()}

    @torch.inference_mode()
    def _logits(self, task: str, enc: dict) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.model.logits(task, batch, self.hidden([task], batch)[task]).float()

    def batches_by_length(self, lengths: list[int]) -> list[list[int]]:
        """Indices in batches of similar length (shortest first, ties in input order), cut by the shared
        helper; callers put results back in input order."""
        order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
        return [batch.tolist() for batch in length_batches(order, np.asarray(lengths), self.batch_size)]

    @torch.inference_mode()
    def class_probs(self, task: str, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """(N, C) class probabilities; single texts longer than the window average over windows."""
        out = np.zeros((len(texts), len(self.tasks[task].labels)), dtype=np.float32)
        lengths = [len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)]
        for rows in self.batches_by_length(lengths):
            chunk = [texts[i] for i in rows]
            if pairs is None:
                enc = self.tokenizer(chunk, truncation=True, max_length=self.window, stride=self.stride,
                                     return_overflowing_tokens=True, padding=True, return_tensors="pt")
                owner = enc.pop("overflow_to_sample_mapping")
            else:
                enc = self.tokenizer(chunk, [pairs[i] for i in rows], truncation="longest_first",
                                     max_length=self.window, padding=True, return_tensors="pt")
                owner = torch.arange(len(chunk))
            probs = torch.softmax(self._logits(task, enc), -1).cpu()  # (F, C)
            summed = torch.zeros(len(chunk), probs.shape[1]).index_add_(0, owner, probs)
            out[rows] = (summed / torch.bincount(owner, minlength=len(chunk)).clamp(min=1)[:, None]).numpy()
        return out

    def token_tags(self, task: str, token_lists: list[list[str]]) -> list[list[str]]:
        """One tag per token of each list; tokens the tokenizer drops (whitespace) get the outside tag."""
        return self.tasks_token_tags([task], token_lists)[task]

    def tasks_token_tags(self, tasks: list[str], token_lists: list[list[str]]) -> dict[str, list[list[str]]]:
        """`token_tags` of several token tasks at once: they read the same encoding of the same texts, so each
        batch goes through the encoder once for all of them (as co-labelled training batches do)."""
        return self._token_pass(tasks, token_lists)[0]

    @torch.inference_mode()
    def _token_pass(self, tasks: list[str], token_lists: list[list[str]], classify: list[str] = (),
                    texts: list[str] | None = None) -> tuple[dict[str, list[list[str]]], dict[str, dict[int, np.ndarray]]]:
        """Tags of the token `tasks` and, from the same encoder pass, the class probabilities of the single-text
        `classify` tasks for every text (`texts[i]` is `token_lists[i]` joined) that fits one window: a text whose
        own encoding is the per-character one (no multi-character piece: most Chinese text) is classified from its
        token row, any other joins the pass as a row of its own encoding. Returns the tags and {task: {row:
        probabilities}} of the rows it classified; `class_probs` does the others (texts longer than a window)."""
        results: dict[str, list[list[str]]] = {task: [[] for _ in token_lists] for task in tasks}
        shared_probs: dict[str, dict[int, np.ndarray]] = {task: {} for task in classify}
        for rows in self.batches_by_length([len(t) for t in token_lists]):
            chunk = [token_lists[i] for i in rows]
            enc = self.tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=self.window,
                                 stride=self.stride, return_overflowing_tokens=True, padding=True, return_tensors="pt")
            owner = enc["overflow_to_sample_mapping"].tolist()
            lengths = enc["attention_mask"].sum(1).tolist()
            batch = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            heads = tasks + [t for t in self.evidence_tasks(tasks) if t not in tasks]  # + the boundaries they read
            if classify:
                encoded, classified = self._with_own_rows(batch, enc, owner, lengths, [texts[i] for i in rows])
            else:
                encoded, classified = batch, []
            hidden = self.hidden(heads + (list(classify) if classified else []), encoded)  # one encoder pass
            if classified:
                take = [row for row, _ in classified]
                every = take == list(range(encoded["input_ids"].shape[0]))  # every row, in order: no gather
                index = None if every else torch.tensor(take, device=self.device)
                sub = encoded if every else {k: v[index] for k, v in encoded.items()}
                for task in classify:
                    states = hidden[task] if every else hidden[task][index]
                    probs = torch.softmax(self.model.logits(task, sub, states).float(), -1).cpu()
                    for (_, sample), p in zip(classified, probs.numpy()):
                        shared_probs[task][rows[sample]] = p
                width = batch["input_ids"].shape[1]
                hidden = {task: h[: len(owner), :width] for task, h in hidden.items()}  # the token rows
            present, layout = windows.place_words(enc, owner, lengths, len(chunk))  # where each word's emissions come from
            windowed = self.model.with_window(heads, batch)  # window features once for every token head
            packed = {}
            for task in heads:
                emissions = self.model.logits(task, windowed, hidden[task]).float().cpu()  # (F, T, C)
                packed[task] = windows.pack(emissions, *layout)
            for task in tasks:
                decoded = self._decode(task, *self._with_evidence(task, packed), present, chunk)
                for sample, tags in enumerate(decoded):
                    results[task][rows[sample]] = tags
        return results, shared_probs

    def evidence_tasks(self, tasks: list[str]) -> list[str]:
        """The word-cutting tasks (a CRF, word output) whose boundaries some of `tasks` read (`boundary_evidence`);
        only trained heads give evidence (a single-task run's checkpoint carries the others untrained)."""
        cutting = [n for n, c in self.tasks.items()
                   if c.crf and c.output in ("words", "tagged_words") and n in self.trained]
        return [n for n in cutting if any(self.tasks[t].boundary_evidence > 0 and t != n for t in tasks)]

    def _with_evidence(self, task: str, packed: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """The task's packed emissions, plus the mean of the other word-cutting tasks' word-start log-odds times its
        `boundary_evidence` (tasks_mtl.boundaries); the mask."""
        emissions, mask = packed[task]
        cfg = self.tasks[task]
        others = [t for t in self.evidence_tasks([task]) if t != task and t in packed]
        if not others or not bool(mask.any()):
            return emissions, mask
        odds = torch.stack([boundaries.start_log_odds(self.model.heads[t].crf, *packed[t],
                                                      boundaries.roles(self.tasks[t].tag_set(), self.tasks[t].scheme)[0])
                            for t in others]).mean(0).cpu()
        start, end = boundaries.roles(cfg.tag_set(), cfg.scheme)
        return boundaries.add_evidence(emissions, mask, odds, cfg.boundary_evidence, start, end), mask

    def _with_own_rows(self, batch: dict, enc, owner: list[int], lengths: list[int],
                       texts: list[str]) -> tuple[dict, list[tuple[int, int]]]:
        """The token batch, plus a row of its own encoding for each text that fits one window but whose own ids are
        not its per-character ids (all right-padded to the longest row); and (row, sample) of every text that fits
        one window: its token row when the ids agree, else its own row. Not with int8 layers: they quantise each
        batch's activations by its range, so an added row would change the token rows' emissions."""
        windows = np.bincount(owner, minlength=len(texts))
        own = self.tokenizer(texts, truncation=True, max_length=self.window)
        ids = enc["input_ids"]
        classified, extra = [], []
        for f, sample in enumerate(owner):
            if windows[sample] != 1:
                continue
            if ids[f, : lengths[f]].tolist() == own["input_ids"][sample]:
                classified.append((f, sample))
            elif self.precision != "int8":  # int8 layers quantise activations per batch: a row would move the tags
                classified.append((len(owner) + len(extra), sample))
                extra.append(sample)
        if not extra:
            return batch, classified
        width = max(ids.shape[1], *(len(own["input_ids"][s]) for s in extra))
        added = self.tokenizer.pad({k: [own[k][s] for s in extra] for k in batch}, padding="max_length",
                                   max_length=width, return_tensors="pt")
        pad = {"input_ids": self.tokenizer.pad_token_id}  # attention_mask, token_type_ids: 0
        return {k: torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=pad.get(k, 0)),
                              added[k].to(self.device)]) for k, v in batch.items()}, classified

    def _decode(self, task: str, packed: torch.Tensor, mask: torch.Tensor, present: list[list[int]],
                chunk: list[list[str]]) -> list[list[str]]:
        """Packed word emissions (`windows.pack`) decoded in one batched Viterbi pass (argmax without a CRF); words
        without a position get the outside tag."""
        tags = self.tasks[task].tag_set()
        outside = "O" if "O" in tags else ("S" if "S" in tags else tags[0])
        head = self.model.heads[task]
        if head.crf is not None:  # a sample without words gets no path
            ids = head.crf.paths(packed, mask.sum(1))
        else:
            ids = [row[: len(words)] for row, words in zip(packed.argmax(-1).tolist(), present)]
        out = []
        for sample, tokens in enumerate(chunk):
            decoded = [outside] * len(tokens)
            for w, i in zip(present[sample], ids[sample]):
                decoded[w] = tags[i]
            out.append(decoded)
        return out

    # -- records ------------------------------------------------------------------------------------

    def predict(self, texts: list[str], text_pairs: list[str | None] | None = None) -> list[dict[str, Any]]:
        """The records of the README (`mtl predict`): `text` (and `text_pair`) plus one key per task."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise PredictionInputError(f"record {i}: `text` must be a non-empty string, got {text!r}")
        pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
        if len(pairs) != len(texts):
            raise PredictionInputError(f"{len(texts)} texts but {len(pairs)} text_pairs")
        records: list[dict[str, Any]] = [{"text": t} | ({"text_pair": p} if p is not None else {})
                                         for t, p in zip(texts, pairs)]
        token_tasks = [name for name, cfg in self.tasks.items() if cfg.type == "token_classification"]
        single = [name for name, cfg in self.tasks.items() if cfg.type == "classification"]
        tagged, shared = (self._token_pass(token_tasks, [list(t) for t in texts], single, texts) if token_tasks
                          else ({}, {name: {} for name in single}))
        for name, cfg in self.tasks.items():
            if cfg.type == "classification":  # the rows the token pass did not classify get their own pass
                rest = [i for i in range(len(texts)) if i not in shared[name]]
                probs = np.zeros((len(texts), len(cfg.labels)), dtype=np.float32)
                if rest:
                    probs[rest] = self.class_probs(name, [texts[i] for i in rest])
                for i, p in shared[name].items():
                    probs[i] = p
                self._add_labels(records, name, probs, range(len(texts)))
            elif cfg.type == "pair_classification":
                which = [i for i, p in enumerate(pairs) if p is not None]
                if which:
                    probs = self.class_probs(name, [texts[i] for i in which], [pairs[i] for i in which])
                    self._add_labels(records, name, probs, which)
        for name in token_tasks:
            cfg = self.tasks[name]
            for record, text, tags in zip(records, texts, tagged[name]):
                record[name] = render_tokens(text, lenient_spans(tags, cfg.scheme), cfg.output)
        return records

    def _add_labels(self, records: list[dict], task: str, probs: np.ndarray, rows) -> None:
        labels = self.tasks[task].labels
        for i, p in zip(rows, probs):
            records[i][task] = {"label": labels[int(p.argmax())], "score": round(float(p.max()), 6)}
