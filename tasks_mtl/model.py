"""The multi-task model: one shared BERT encoder, one head per task.

Sharing schemes, chosen per task in the config:
- hard (default): the head reads the top layer;
- hierarchical: the head reads a lower layer (`layer: k`, 0 = embeddings), so low-level tasks such
  as segmentation can sit low and sentence tasks on top; the encoder only runs as deep as needed;
- soft: the task owns private copies of the top `soft_layers` layers, tied to the shared ones by an
  L2 penalty (`soft_l2`) added to that task's loss.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tasks_mtl import fast_dropout, fast_encoder
from tasks_mtl.config import Config, TaskConfig
from tasks_mtl.ngrams import BigramEmbedding, NgramTables, WindowFeatures, sparse_parameters, window_index
from tasks_mtl.tasks import build_task


def bf16_fast(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively here (avx512_bf16 or AMX on a CPU; a bf16-capable GPU).
    Without them a CPU emulates bf16 hundreds of times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def new_model(cfg: Config, tokenizer, ngrams: NgramTables | None) -> MultiTaskModel:
    """A fresh multi-task model for the run: its encoder, the configured heads, and the n-gram parts."""
    bigram_dim = cfg.encoder.bigram_dim if cfg.encoder.use_bigrams() else 0
    window_dim = cfg.encoder.window_dim if any(t.window_features for t in cfg.tasks.values()) else 0
    return MultiTaskModel(new_encoder(cfg, len(tokenizer), tokenizer.pad_token_id), cfg.tasks, ngrams,
                          bigram_dim=bigram_dim, bigram_zero_init=cfg.encoder.pretrained is not None,
                          window_dim=window_dim)


def new_encoder(cfg: Config, vocab_size: int, pad_token_id: int):
    """A BERT encoder: loaded from a local directory, or a small one built from config (random init)."""
    from transformers import BertConfig, BertModel

    if cfg.encoder.pretrained is not None:
        from tasks_mtl.tokenization import require_local_model

        path = require_local_model(cfg.path(cfg.encoder.pretrained))
        bert = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
        # either mismatch would otherwise surface as an index error in the embeddings, mid-batch
        if vocab_size > bert.config.vocab_size:
            raise ValueError(f"encoder.pretrained: the vocabulary of {path} has {vocab_size} tokens, its "
                             f"model embeds {bert.config.vocab_size}; vocab.txt and the weights must match")
        if cfg.encoder.max_length > bert.config.max_position_embeddings:
            raise ValueError(f"encoder.max_length {cfg.encoder.max_length} exceeds the "
                             f"{bert.config.max_position_embeddings} positions of {path}; lower it")
        return bert
    e = cfg.encoder
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=e.hidden, num_hidden_layers=e.layers, num_attention_heads=e.heads,
        intermediate_size=e.intermediate, max_position_embeddings=e.max_positions, hidden_dropout_prob=e.dropout,
        attention_probs_dropout_prob=e.dropout, pad_token_id=pad_token_id,
    )
    return BertModel(config, add_pooling_layer=False)


class MultiTaskModel(nn.Module):
    """`ngrams` (token-id n-gram tables) feed the bigram embeddings (`bigram_dim` > 0), the n-gram
    bags of sentence heads and the window features of token heads (`window_dim` > 0, one table shared
    by those heads); `bigram_zero_init` starts the bigram projection at zero (pretrained BERT)."""

    def __init__(self, bert: nn.Module, tasks: dict[str, TaskConfig], ngrams: NgramTables | None = None,
                 bigram_dim: int = 0, bigram_zero_init: bool = False, window_dim: int = 0):
        super().__init__()
        self.bert = fast_dropout.install(bert)  # before `private` copies its layers
        self.task_cfgs = dict(tasks)
        self.task_types = {name: build_task(name, t) for name, t in tasks.items()}
        hidden = bert.config.hidden_size
        depth = bert.config.num_hidden_layers
        words = bert.embeddings.word_embeddings
        window_dim = window_dim if any(t.window_features for t in tasks.values()) else 0
        if (bigram_dim or any(t.has_features() for t in tasks.values())) and ngrams is None:
            raise ValueError("bigram embeddings, window features and n-gram bags need the n-gram tables of "
                             "the tokenize step")
        self.ngrams = ngrams
        self.bigram_dim, self.bigram_zero_init = bigram_dim, bigram_zero_init
        self.bigrams = BigramEmbedding(ngrams, bigram_dim, hidden, bigram_zero_init) if bigram_dim else None
        self.window_dim = window_dim
        self.window = WindowFeatures(ngrams, words.num_embeddings, window_dim) if window_dim else None
        width = window_dim * WindowFeatures.SLOTS
        self.heads = nn.ModuleDict({n: t.build_head(hidden, words, ngrams, window=width)
                                    for n, t in self.task_types.items()})
        self.private = nn.ModuleDict({
            n: nn.ModuleList(copy.deepcopy(bert.encoder.layer[depth - t.soft_layers:]))
            for n, t in tasks.items() if t.sharing == "soft"
        })
        fast_dropout.install(self)  # the heads' and n-gram parts' dropouts

    @property
    def depth(self) -> int:
        return self.bert.config.num_hidden_layers

    def read_layer(self, task: str) -> int:
        """Index into the hidden states the task's head reads (0 = embeddings, depth = top)."""
        cfg = self.task_cfgs[task]
        if cfg.sharing == "soft":
            return self.depth
        layer = cfg.layer if cfg.layer >= 0 else self.depth + 1 + cfg.layer
        if not 0 <= layer <= self.depth:
            raise ValueError(f"task {task!r}: layer {cfg.layer} outside 0..{self.depth}")
        return layer

    def encode(self, batch: dict, upto: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Embeddings and the first `upto` shared layers: (B, T) ids -> [embeddings, layer 1, ..., layer upto]
        hidden states, each (B, T, H), plus the attention mask."""
        from transformers.masking_utils import create_bidirectional_mask

        ids = batch["input_ids"]
        embeds = self.bert.embeddings.word_embeddings(ids)  # (B, T, H)
        if self.bigrams is not None:
            embeds = embeds + self.bigrams(ids)
        hidden = self.bert.embeddings(inputs_embeds=embeds, token_type_ids=batch.get("token_type_ids"))
        hidden = hidden.to(self.bert.encoder.layer[0].output.LayerNorm.weight.dtype)  # bf16 layers (`layers_to`)
        mask = create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden,
                                         attention_mask=batch["attention_mask"])
        states = [hidden]
        for layer in self.bert.encoder.layer[:upto]:
            states.append(fast_encoder.run(layer, states[-1], mask))
        return states, mask

    def tasks_hidden(self, tasks: list[str], batch: dict) -> dict[str, torch.Tensor]:
        """The hidden states (B, T, H) each task's head reads, from one pass through the shared layers."""
        private = {t: self.private[t] for t in tasks if t in self.private}
        upto = max(self.depth - len(private[t]) if t in private else self.read_layer(t) for t in tasks)
        states, mask = self.encode(batch, upto)
        out = {}
        for task in tasks:
            if task not in private:
                out[task] = states[self.read_layer(task)]
                continue
            hidden = states[self.depth - len(private[task])]
            for layer in private[task]:
                hidden = fast_encoder.run(layer, hidden, mask)
            out[task] = hidden
        return out

    def task_hidden(self, task: str, batch: dict) -> torch.Tensor:
        """The hidden states (B, T, H) the task's head reads."""
        return self.tasks_hidden([task], batch)[task]

    def with_window(self, tasks: list[str], batch: dict) -> dict:
        """The batch plus `window_features` (B, T, 10 D) and `window_index` (B, T, 10) when one of `tasks`
        reads them (computed once for all)."""
        features = self.window is not None and any(self.task_cfgs[t].window_features for t in tasks)
        if not (features or any(self.task_cfgs[t].window_weights for t in tasks)):
            return batch
        if "window_index" in batch and (not features or "window_features" in batch):
            return batch  # computed for all of them before
        index = window_index(self.ngrams, batch["input_ids"], batch["attention_mask"])
        batch = batch | {"window_index": index}
        return batch | {"window_features": self.window.embed(index)} if features else batch

    def logits(self, task: str, batch: dict, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The task head's output on a batch (prediction)."""
        hidden = self.task_hidden(task, batch) if hidden is None else hidden
        return self.task_types[task].logits(self.heads[task], hidden, self.with_window([task], batch))

    def soft_penalty(self, task: str) -> torch.Tensor | None:
        """L2 distance of a soft-shared task's private layers from the shared ones, times soft_l2."""
        if task not in self.private:
            return None
        private = self.private[task]
        shared = self.bert.encoder.layer[self.depth - len(private):]
        dist = sum(((p - s) ** 2).sum() for p, s in zip(private.parameters(), shared.parameters()))
        return self.task_cfgs[task].soft_l2 * dist

    def forward(self, task: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of one task on one of its batches."""
        return self.forward_tasks([task], batch)[task]

    def forward_tasks(self, tasks: list[str], batch: dict,
                      features_only: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Loss and logits of several tasks that label the same batch of texts, from one encoding.

        A co-labelled batch carries `labels/<task>` per task (IGNORE where a row lacks that task's labels);
        a task with no label in the batch is left out of the result. `features_only` skips the encoder: the
        heads see zero hidden states, so only their n-gram features (and biases) score: with a CRF, a token
        head is then a linear-chain CRF over the window features, the model its classical peer is."""
        if features_only:
            zeros = torch.zeros(*batch["input_ids"].shape, self.bert.config.hidden_size,
                                device=batch["input_ids"].device)
            hidden = dict.fromkeys(tasks, zeros)
        else:
            hidden = self.tasks_hidden(tasks, batch)
        batch = self.with_window(tasks, batch)
        out = {}
        for task in tasks:
            task_batch = batch if len(tasks) == 1 else batch | {"labels": batch[f"labels/{task}"]}
            if len(tasks) > 1 and not bool((task_batch["labels"] != -100).any()):
                continue
            loss, logits = self.task_types[task].loss(self.heads[task], hidden[task], task_batch)
            penalty = self.soft_penalty(task)
            out[task] = (loss if penalty is None else loss + penalty), logits
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """Dense encoder parameters that train (what gradient-surgery methods operate on)."""
        sparse = {id(p) for p in sparse_parameters(self)}
        extra = list(self.bigrams.parameters()) if self.bigrams is not None else []
        return [p for p in [*self.bert.parameters(), *extra] if p.requires_grad and id(p) not in sparse]

    def private_parameters(self) -> list[nn.Parameter]:
        """Parameters that take the weighted sum of the task gradients: heads, soft-sharing layers, and the
        sparse n-gram tables (too large to flatten into per-task gradient rows)."""
        extra = [*sparse_parameters(self.bigrams)] if self.bigrams is not None else []
        extra += list(self.window.parameters()) if self.window is not None else []
        return [p for p in [*self.heads.parameters(), *self.private.parameters(), *extra] if p.requires_grad]

    def freeze(self, freeze_layers: int | str) -> None:
        """Freeze the whole encoder ("all"), nothing ("none"), or the embeddings and the bottom k layers. Heads
        train, except a TF-IDF regression without `tfidf_tune`, which keeps the weights of its fit."""
        for p in self.bert.parameters():
            p.requires_grad = freeze_layers != "all"
        if isinstance(freeze_layers, int):
            frozen = [self.bert.embeddings, *self.bert.encoder.layer[:freeze_layers]]
            for module in frozen:
                for p in module.parameters():
                    p.requires_grad = False
        for p in [*self.heads.parameters(), *self.private.parameters()]:
            p.requires_grad = True
        for task, cfg in self.task_cfgs.items():  # a fitted TF-IDF regression stays as fitted unless tuned
            if cfg.tfidf and not cfg.tfidf_tune:
                for p in self.heads[task].tfidf.parameters():
                    p.requires_grad = False
        for module in (self.bigrams, self.window):  # new weights, never pretrained: nothing to protect
            for p in module.parameters() if module is not None else []:
                p.requires_grad = True

    def layers_to(self, dtype: torch.dtype) -> MultiTaskModel:
        """Cast the encoder's transformer layers (shared and private) to `dtype`, for inference in bf16 where it is
        fast (`bf16_fast`). Embeddings, n-gram parts and heads stay fp32: `encode` casts the embeddings' output to
        the layers' dtype, and their readers cast the hidden states back (`tasks_mtl.predict`)."""
        self.bert.encoder.to(dtype)
        self.private.to(dtype)
        return self

    def encoder_layer_of(self, name: str) -> int:
        """Depth of a `bert.` parameter for layer-wise LR decay: 0 embeddings, i+1 for layer i."""
        if name.startswith("embeddings."):
            return 0
        if name.startswith("encoder.layer."):
            return int(name.split(".")[2]) + 1
        return self.depth
