"""One typed configuration tree for a run.

Defaults live here; `params.yaml` holds only the differences, and its `profiles:` section holds
named override sets (quick, gpu, ...). Unknown keys anywhere are an error, so a typo in
params.yaml stops the run instead of being ignored.

Resolution order: code defaults <- params.yaml top level <- params.yaml profiles[<profile>]
<- explicit overrides (dotted keys, as `dvc exp run -S` or tests pass them).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

TaskType = Literal["classification", "pair_classification", "token_classification", "mlm"]
TagScheme = Literal["bio", "bioes", "bmes"]
SPLITS = ("train", "validation", "test")

# The People's Daily 1998-01 POS tag set, as it occurs in the bundled corpus (44 tags; the last
# three occur once each and are kept so that the declared set matches the data).
PEOPLES_DAILY_POS = [
    "n", "v", "w", "u", "d", "vn", "m", "p", "nr", "a", "r", "ns", "c", "q", "t", "f", "j", "b",
    "l", "ad", "i", "Ng", "s", "nz", "nt", "an", "y", "Vg", "z", "k", "vd", "Tg", "nx", "Ag",
    "Dg", "o", "h", "e", "Rg", "Bg", "Mg", "vvn", "na", "Yg",
]


# The names of tasks_mtl.weighting.WEIGHTINGS, kept here so that loading a config does not import torch
# (tests/code/test_config.py checks that both agree).
WEIGHTING_NAMES = ("equal", "static", "uncertainty", "dwa", "rlw", "gradnorm", "pcgrad", "cagrad", "imtl_g",
                   "nash_mtl", "famo")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EncoderConfig(Strict):
    pretrained: Path | None = None  # a local Hugging Face BERT directory; None = small BERT below
    layers: int = 4  # small BERT: 4 layers x 256 trains at ~5k tokens/s on 2 cores
    hidden: int = 256
    heads: int = 4
    intermediate: int = 1024  # 4 x hidden, as in BERT
    max_positions: int = 512  # positions the encoder can take; predict slides windows beyond it
    dropout: float = 0.1
    vocab_size: int = 8000  # WordPiece pieces beyond the alphabet; every character seen in training gets an id
    vocab_min_frequency: int = 2  # a piece seen once is noise; its characters stay in the alphabet
    max_length: int = 256  # training window in tokens; reviews: 18% over 126 chars, 2% over 254; sentences ~35
    bigrams: bool | None = None  # char-bigram embeddings added to the input; None: on from scratch, off when pretrained
    bigram_dim: int = 64  # per bigram (left and right of a position, concatenated, projected to hidden)
    ngram_min_count: int = 2  # n-grams seen fewer times in the training text map to "unknown"
    window_dim: int = 32  # width of each of the 10 window-feature slots that token tasks with window_features read

    def use_bigrams(self) -> bool:
        return self.bigrams if self.bigrams is not None else self.pretrained is None


class TaskConfig(Strict):
    type: TaskType
    bundled: Literal["sentiment", "ner", "cws", "pos", "nsp", "mlm"] | None = None  # built-in corpus
    files: dict[str, Path] = Field(default_factory=dict)  # split -> file, or "all" -> split by rule
    format: Literal["jsonl", "csv", "conll"] | None = None  # None: from the file suffix
    labels: list[str] = Field(default_factory=list)  # classes, or entity/POS types of a token task
    scheme: TagScheme = "bio"  # tag scheme the task trains on; any input scheme is converted
    crf: bool = False  # token tasks: CRF layer over the emissions
    window_features: bool = False  # token tasks: tag scores also read straight from the char window (CRF features)
    window_weights: bool = False  # token tasks: a weight per window feature and tag of its own (a CRF's emission
    #                               weights, unfactorised: features x tags rows, for tasks with few tags)
    lbfgs_iterations: int = Field(0, ge=0)  # token tasks with window_weights + crf: the features stage fits that
    #                                        CRF by L-BFGS for this many iterations (tasks_mtl.crf_fit); 0 = by SGD
    pooling: Literal["cls", "mean", "pair"] = "cls"  # sentence tasks: [CLS], masked mean, or pair (two segments compared)
    ngram_bag: int = 0  # sentence tasks: dim of a bag of char 1-3-gram embeddings beside the pooled vector (0 = off)
    ngram_bag_norm: Literal["mean", "sqrt"] = "mean"  # the bag's sum divided by the n-gram count, or by its square
    #                                                  root (as an L2-normalised tf vector: long texts keep weight)
    tfidf: bool = False  # classification: TF-IDF char 1-3-gram scores added to the logits, fitted by logistic
    #                      regression in the features stage (tasks_mtl.tfidf)
    tfidf_nb: bool = True  # with tfidf, two classes: columns scaled by their naive-Bayes log-count ratio before the
    #                        fit (NBSVM features; reviews: validation 0.850 / test 0.865 against 0.837 / 0.860 plain)
    tfidf_tune: bool = False  # with tfidf: SGD also tunes the fitted TF-IDF weights in later stages (off: they keep
    #                           the regression's fit, C = 4 chosen on validation; SGD over them drifted in full runs)
    tfidf_select: bool = True  # with tfidf: when the last stage ends, the weight of the head's own logits beside
    #                            the TF-IDF scores (0, 0.25, ..., 1) is chosen by validation accuracy
    encoder_loss: bool = True  # with tfidf: the encoder's own logits also get a cross-entropy of their own, so the
    #                            encoder learns a whole classifier, not only the residual a fitted regression leaves
    neighbours: bool = False  # mlm: each masked token is also scored from its neighbours' n-grams (tokens at -2, -1,
    #                           +1, +2, bigrams (-2,-1), (+1,+2)), an n-gram LM beside the encoder (tasks_mtl.tasks.mlm)
    pair_overlap: bool = False  # pair tasks: the two texts' char 1-3-gram overlap (3 features) beside the pooled vector
    output: Literal["spans", "words", "tagged_words"] = "spans"  # token tasks: shape of a prediction
    boundary_evidence: float = Field(0.0, ge=0)  # token tasks with a CRF and word output: weight of the other such
    #                                           tasks' word-start log-odds in this task's Viterbi (tasks_mtl.boundaries)
    layer: int = -1  # hierarchical sharing: encoder layer the head reads (-1 = top, 0 = embeddings)
    sharing: Literal["hard", "soft"] = "hard"  # soft: private copies of the top layers, L2-tied
    soft_layers: int = 1  # soft sharing: how many top layers the task owns
    soft_l2: float = 1e-3  # soft sharing: weight of the L2 tie to the shared layers
    max_rows: dict[str, int] = Field(default_factory=dict)  # split -> cap (quick runs)

    @model_validator(mode="after")
    def _has_data(self) -> TaskConfig:
        if self.bundled is None and not self.files:
            raise ValueError("a task needs either `bundled:` or `files:`")
        bad = set(self.files) - {*SPLITS, "all"}
        if bad:
            raise ValueError(f"files: unknown split(s) {sorted(bad)}; use train/validation/test or all")
        if (self.window_features or self.window_weights or self.crf) and self.type != "token_classification":
            raise ValueError("window_features, window_weights and crf belong to token_classification tasks")
        if self.lbfgs_iterations and not (self.window_weights and self.crf and not self.window_features):
            raise ValueError("lbfgs_iterations fits a task's own window CRF: it needs window_weights and crf, and "
                             "window_features off (the shared window embeddings would add scores the fit ignores)")
        if self.boundary_evidence and not (self.crf and self.output in ("words", "tagged_words")):
            raise ValueError("boundary_evidence weighs other tasks' word boundaries in a CRF's decode: it needs "
                             "crf and output words or tagged_words")
        if self.neighbours and self.type != "mlm":
            raise ValueError("neighbours scores a masked token from its context: it belongs to mlm tasks")
        if self.tfidf and self.type != "classification":
            raise ValueError("tfidf scores a single text: it belongs to classification tasks")
        if self.pair_overlap and self.pooling != "pair":
            raise ValueError("pair_overlap compares the two texts of a pair: it needs pooling: pair")
        if self.pooling == "pair" and self.type != "pair_classification":
            raise ValueError("pooling: pair compares the two texts of a pair_classification task")
        return self

    def has_features(self) -> bool:
        """Whether the head reads n-gram features of its own (window features, an n-gram bag)."""
        return (self.window_features or self.window_weights or self.pair_overlap or self.tfidf or self.neighbours
                or self.ngram_bag > 0)

    def fitted(self) -> bool:
        """Whether the features stage fits the head's n-gram model by a convex solver (L-BFGS CRF, logistic
        regression) instead of SGD."""
        return self.lbfgs_iterations > 0 or self.tfidf

    def tag_set(self) -> list[str]:
        """All tags a token task can emit, in a fixed order (index = class id)."""
        if self.type != "token_classification":
            return list(self.labels)
        prefixes = {"bio": "BI", "bioes": "BIES", "bmes": "BMES"}[self.scheme]
        if not self.labels:  # untyped scheme, e.g. plain B/M/E/S segmentation
            return list(prefixes) if self.scheme == "bmes" else ["O", *prefixes]
        outside = [] if self.scheme == "bmes" else ["O"]
        return outside + [f"{p}-{t}" for t in self.labels for p in prefixes]


LBFGS_ITERATIONS = 100  # as the peers' CRFs (FINDINGS); other counts not measured for the fit


def _default_tasks() -> dict[str, TaskConfig]:
    return {
        # sentiment: the peer's TF-IDF regression inside the head (on NB-scaled columns), the encoder's mean-pooled
        # vector beside it
        "sentiment": TaskConfig(type="classification", bundled="sentiment", labels=["negative", "positive"],
                                pooling="mean", tfidf=True),
        # token tasks: the CRF's own features beside the encoder, and a CRF over the tags (ablation, 600 steps
        # of ner+cws: F1 0.624/0.865 without either, 0.721/0.920 with window features, 0.774/0.926 with both).
        # ner (7 tags) owns its window weights, fitted by L-BFGS before SGD touches them: ner alone, 600 Adam steps
        # of the window CRF gave test F1 0.905, L-BFGS 0.951, and 400 joint steps on top 0.957; a full run 0.959.
        # cws did better on the shared window embeddings by SGD (full runs: 0.968) than fitted so (0.965)
        "ner": TaskConfig(type="token_classification", bundled="ner", labels=["PER", "LOC", "ORG"], scheme="bio",
                          window_weights=True, crf=True, lbfgs_iterations=LBFGS_ITERATIONS),
        # cws and pos cut the same sentences into words: each decodes with the other's word boundaries as evidence,
        # weights chosen on the validation split of the default model (cws 0.9656 -> 0.9685 at 1, pos 0.9325 ->
        # 0.9334 at 0.5; pos fell at 1 and 2)
        "cws": TaskConfig(type="token_classification", bundled="cws", scheme="bmes", output="words",
                          window_features=True, crf=True, boundary_evidence=1.0),
        "pos": TaskConfig(type="token_classification", bundled="pos", labels=PEOPLES_DAILY_POS, scheme="bio",
                          output="tagged_words", window_features=True, crf=True, boundary_evidence=0.5),
        "nsp": TaskConfig(type="pair_classification", bundled="nsp", labels=["not_next", "is_next"], pooling="pair",
                          ngram_bag=32, pair_overlap=True),
        # mlm: an n-gram LM over each masked token's neighbours beside the encoder (from scratch, MLM alone stays on
        # its unigram plateau, accuracy ~0.045, through 1,200 steps)
        "mlm": TaskConfig(type="mlm", bundled="mlm", neighbours=True),
    }


class DataConfig(Strict):
    raw_dir: Path = Path("data")  # tracked by data.dvc; nothing else may write here
    prepared_dir: Path = Path("prepared")  # per-task splits as JSONL
    tokenized_dir: Path = Path("tokenized")  # Arrow datasets + tokenizer
    min_chars: int = 1  # validation: shortest acceptable text
    max_chars: int = 5000  # validation: longest review is 2,876 chars
    min_rows: dict[str, int] = Field(default_factory=lambda: {"train": 20, "validation": 5, "test": 5})
    min_class_share: float = 0.05  # validation: each class at least this share of a split
    mlm_sentences: int = 60000  # cap of MLM texts (reviews + sentences), train split


class StageConfig(Strict):
    name: str
    tasks: list[str] | None = None  # None = every configured task
    freeze_layers: int | Literal["all", "none"] = "none"  # int k: embeddings + bottom k layers
    features_only: bool = False  # the heads' n-gram features alone, encoder skipped (see scratch_stages)
    batch_tokens: int | None = None  # this stage's token budget per batch; None: training.batch_tokens
    steps: int | None = None  # optimizer steps; or give epochs
    epochs: float | None = None  # over the largest task of the stage
    encoder_lr: float = 1e-4
    head_lr: float = 1e-3
    ngram_lr: float = 5e-3  # n-gram bags of sentence heads: a bag of embeddings learns at ~5x the encoder's rate
    layer_decay: float = 1.0  # layer-wise LR decay factor per layer below the top (1 = none)
    warmup: float = 0.1  # fraction of the stage's steps with linear warm-up, then linear decay
    weighting: str = "equal"
    weighting_args: dict[str, Any] = Field(default_factory=dict)
    sampler: str = "round_robin"
    sampler_args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _length(self) -> StageConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"stage {self.name!r}: give exactly one of steps or epochs")
        if self.features_only and self.freeze_layers != "none":
            raise ValueError(f"stage {self.name!r}: a features_only stage does not run the encoder; "
                             "freeze_layers does not apply")
        return self

    def task_names(self, tasks: dict[str, TaskConfig]) -> list[str]:
        """The tasks the stage trains: its list, else every configured task (a features_only stage: every task
        whose head has n-gram features)."""
        if self.tasks is not None:
            return list(self.tasks)
        return [n for n, t in tasks.items() if t.has_features()] if self.features_only else list(tasks)


def scratch_stages(tasks: dict[str, TaskConfig] | None = None) -> list[StageConfig]:
    """An encoder from random init: nothing to protect, so no freezing.

    1. `features`: the heads' n-gram models alone, the encoder skipped. ner owns a window CRF (a weight
       per window feature and tag) and sentiment a TF-IDF regression: convex problems, fitted first by their
       solvers (L-BFGS via crfsuite, logistic regression via scikit-learn) on exactly the features the model
       reads, reaching the classical peers (ner F1 0.951, sentiment 0.856 alone); SGD fits too slowly for them
       (ner alone after 600 Adam steps: train F1 0.956, test 0.905). Then SGD in big batches (~0.2 s per 8k-token
       step) trains the window embeddings that cws and pos share, their CRFs, and nsp's n-gram overlap and bag.
    2. `joint`: every task, every layer training from the first step, the features tuned on.
    Sized for a ~25-minute `make run` on 2 CPU cores (the joint stage at 0.31-0.40 s per step of ~2,000 tokens in
    bf16: 2,600 steps 13-17 minutes; 1,700 steps gave sentiment 0.858, ner 0.960, 2,600 gave 0.858-0.860, 0.961). Without a task that has n-gram features (`tasks`), only the joint stage."""
    joint = StageConfig(name="joint", freeze_layers="none", steps=2600, encoder_lr=1e-3, head_lr=1e-3, warmup=0.05,
                        sampler="fixed", sampler_args={"weights": DEFAULT_TASK_SHARES})
    if tasks is not None and not any(t.has_features() for t in tasks.values()):
        return [joint]
    features = StageConfig(name="features", features_only=True, batch_tokens=8192, steps=1300, head_lr=5e-3,
                           ngram_lr=2e-2, warmup=0.02, sampler="fixed", sampler_args={"weights": FEATURE_TASK_SHARES})
    return [features, joint]


def pretrained_stages() -> list[StageConfig]:
    """A pretrained encoder: warm the new heads up on a frozen encoder, tune jointly with the bottom
    layer frozen, then fine-tune everything at a lower rate."""
    return [
        StageConfig(name="warmup", freeze_layers="all", steps=200, head_lr=2e-3, warmup=0.0),  # heads only
        StageConfig(name="joint", freeze_layers=1, steps=800, encoder_lr=5e-5, head_lr=1e-3,
                    weighting="uncertainty", sampler="temperature", sampler_args={"temperature": 5.0}),
        StageConfig(name="full", freeze_layers="none", steps=1000, encoder_lr=3e-5, head_lr=5e-4,
                    layer_decay=0.9, sampler="temperature", sampler_args={"temperature": 5.0}),
    ]


# Share of the steps per task (a co-labelled group draws the sum of its tasks' shares): the token tasks
# ride on one forward pass, sentiment needs epochs of its own, nsp and mlm are auxiliary.
DEFAULT_TASK_SHARES = {"ner": 0.3, "cws": 0.15, "pos": 0.15, "sentiment": 0.3, "nsp": 0.05, "mlm": 0.05}
# The features stage's SGD part (ner and sentiment are fitted by convex solvers before it): cws and pos co-labelled;
# nsp a little (its n-gram overlap is three features: logistic regression on them alone reaches 0.79); mlm's
# neighbour n-gram LM a fifth (alone, 300 steps of 8k tokens took it from chance to accuracy 0.25).
FEATURE_TASK_SHARES = {"cws": 0.35, "pos": 0.35, "nsp": 0.1, "mlm": 0.2}


# Weightings whose update survives fp16's loss scale S: their task weights read loss values (left unscaled) or
# nothing, and the shared update they build from per-task gradients scales with S (so dividing by S undoes it).
# uncertainty, famo and gradnorm train parameters of their own on the gradients; nash_mtl's update does not
# scale with S.
FP16_WEIGHTINGS = ("equal", "static", "rlw", "dwa", "pcgrad", "cagrad", "imtl_g")


class TrainingConfig(Strict):
    batch_size: int = 32  # sequences per task batch (when batch_tokens is None)
    batch_tokens: int | None = 2048  # token budget per batch, cut from length-sorted buckets (padding counted)
    co_label: bool = True  # token tasks that label the same texts train from one forward pass
    eval_batch_size: int = 64
    grad_accum: int = 1  # batches per optimizer step
    clip_norm: float = 1.0  # 0 disables clipping
    max_nonfinite_steps: int = Field(10, ge=0)  # steps with a NaN/inf loss a stage skips before it stops
    weight_decay: float = 0.01
    bf16: bool | None = None  # autocast to bfloat16; None: on where the device runs it fast (avx512_bf16/AMX CPU, GPU)
    fp16: bool = False  # autocast to float16 with dynamic loss scaling (torch.amp.GradScaler), for GPUs without bf16
    #                     (V100, T4); excludes bf16 and the weightings outside FP16_WEIGHTINGS
    device: str = "auto"  # auto: cuda when present, else cpu
    threads: int | None = None  # torch intra-op threads; None = torch's default
    nproc: int = Field(1, ge=1)  # training processes on this machine (torchrun, tasks_mtl/distributed.py); the
    #                              batch settings are per process, so the global batch is nproc times them
    save_every: int = 500  # steps between resumable checkpoints inside a stage (0 = off)
    log_every: int = 25  # steps between logged losses
    conflict_every: int = Field(0, ge=0)  # steps between task-gradient cosine samples (tasks_mtl/conflict.py); 0 = off
    output_dir: Path = Path("checkpoints")
    stages: list[StageConfig] | None = None  # None: scratch_stages() or pretrained_stages(), by the encoder

    @model_validator(mode="after")
    def _precision(self) -> TrainingConfig:
        if self.fp16 and self.bf16:
            raise ValueError("training.fp16 and training.bf16 are both on: pick one precision")
        return self


class GatesConfig(Strict):
    # task -> metric -> minimum value on the test split. The default model must beat what users already
    # have: the classical peers on the same split (benchmarks/peers.py; FINDINGS: TF-IDF+LR sentiment
    # 0.860, char CRF ner F1 0.955, cws F1 0.967, pos tag accuracy 0.9355) minus a margin of 0.01.
    # nsp and mlm have no peer: their floors sit well above chance. Never lowered to pass a model.
    thresholds: dict[str, dict[str, float]] = Field(default_factory=lambda: {
        "sentiment": {"accuracy": 0.85},
        "ner": {"f1": 0.945},
        "cws": {"f1": 0.957},
        "pos": {"accuracy": 0.9255},
        "nsp": {"accuracy": 0.6},
        "mlm": {"accuracy": 0.2},
    })
    tolerance: dict[str, float] = Field(default_factory=lambda: {"default": 0.01})  # metric -> allowed drop
    lower_is_better: list[str] = Field(default_factory=lambda: ["perplexity", "loss"])


class RegistryConfig(Strict):
    model_name: str = "mtl-bert-zh"
    experiment: str = "mtl-zh"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite file in the checkout


class Config(Strict):
    profile: str = "default"  # the params.yaml profile this was loaded with (set by load_config; tags each version)
    production: bool = True  # may this run's model become `champion`; a smoke profile says false (README, "Registry")
    seed: int = 1234
    root: Path = Path(".")  # directory relative paths are resolved against (params.yaml's)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    tasks: dict[str, TaskConfig] = Field(default_factory=_default_tasks)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    reports_dir: Path = Path("reports")

    @model_validator(mode="after")
    def _stages(self) -> Config:
        if self.training.stages is None:
            self.training.stages = pretrained_stages() if self.encoder.pretrained else scratch_stages(self.tasks)
        pretrained = self.encoder.pretrained is not None
        for stage in self.training.stages:
            unknown = set(stage.tasks or []) - set(self.tasks)
            if unknown:
                raise ValueError(f"stage {stage.name!r} names unknown task(s) {sorted(unknown)}")
            plain = [t for t in stage.task_names(self.tasks) if not self.tasks[t].has_features()]
            if stage.features_only and (plain or not stage.task_names(self.tasks)):
                raise ValueError(f"stage {stage.name!r} is features_only, but task(s) {plain or 'none'} have no "
                                 "n-gram features (window_features, ngram_bag) to train")
            if stage.freeze_layers != "none" and not pretrained:
                raise ValueError(
                    f"stage {stage.name!r} freezes encoder layers, but the encoder is not pretrained: freezing "
                    "protects pretrained weights only. Set encoder.pretrained, put an MLM-only pretraining "
                    "stage before it, or use freeze_layers: none")
            pretrained = pretrained or is_pretraining(stage, self.tasks)
        return self

    @model_validator(mode="after")
    def _names(self) -> Config:
        """Weighting and sampler names and gate tasks are checked when the config loads, not after a stage."""
        from tasks_mtl.sampling import SAMPLERS  # numpy only; the weighting registry would import torch

        for stage in self.training.stages or []:
            if stage.weighting not in WEIGHTING_NAMES:
                raise ValueError(f"stage {stage.name!r}: unknown weighting {stage.weighting!r}; "
                                 f"choose one of {', '.join(sorted(WEIGHTING_NAMES))}")
            if self.training.fp16 and stage.weighting not in FP16_WEIGHTINGS:
                raise ValueError(f"stage {stage.name!r}: weighting {stage.weighting!r} does not work under "
                                 f"training.fp16's loss scaling; use bf16 or fp32, or one of {', '.join(FP16_WEIGHTINGS)}")
            if stage.sampler not in SAMPLERS:
                raise ValueError(f"stage {stage.name!r}: unknown sampler {stage.sampler!r}; "
                                 f"choose one of {', '.join(sorted(SAMPLERS))}")
        absent = sorted(set(self.gates.thresholds) - set(self.tasks))
        if absent and "thresholds" not in self.gates.model_fields_set:  # the code defaults follow the task set
            self.gates.thresholds = {t: v for t, v in self.gates.thresholds.items() if t in self.tasks}
        elif absent:
            raise ValueError(f"gates.thresholds names task(s) {absent} that the run does not train")
        return self

    def config_hash(self) -> str:
        """sha256 of the resolved configuration, `root` left out (where the checkout is, not what it runs)."""
        resolved = self.model_dump(mode="json", exclude={"root"})
        return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode("utf-8")).hexdigest()

    def trained_tasks(self, upto: int | None = None) -> list[str]:
        """The tasks some stage trains, of the stages up to index `upto` (all stages when None)."""
        stages = self.training.stages if upto is None else self.training.stages[: upto + 1]
        return sorted({t for stage in stages for t in stage.task_names(self.tasks)})

    def path(self, p: Path | str) -> Path:
        """Resolve a configured path against the run root."""
        p = Path(p)
        return p if p.is_absolute() else (self.root / p).resolve()


def is_pretraining(stage: StageConfig, tasks: dict[str, TaskConfig]) -> bool:
    """A stage that trains only masked-LM tasks pretrains the encoder for the stages after it."""
    names = stage.task_names(tasks)
    return not stage.features_only and bool(names) and all(tasks[n].type == "mlm" for n in names)


def deep_merge(base: dict, override: dict) -> dict:
    """Merge `override` into a copy of `base`; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dotted(overrides: dict[str, Any]) -> dict:
    nested: dict = {}
    for dotted_key, value in overrides.items():
        node = nested
        *parents, leaf = dotted_key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_config(
    params: Path | str | None = "params.yaml",
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build the run configuration from params.yaml, a profile and dotted-key overrides. A params file
    that is named must exist; `params=None` starts from the code defaults.

    The profile comes from the argument, else $MTL_PROFILE, else `profile:` in params.yaml.
    Task entries in params.yaml merge into the default tasks of the same name; `tasks_replace:
    true` in params.yaml starts from no tasks instead.
    """
    raw: dict = {}
    root = Path.cwd()
    if params is not None and not Path(params).is_file():
        raise FileNotFoundError(f"params file {params} not found")
    if params is not None:
        raw = yaml.safe_load(Path(params).read_text(encoding="utf-8")) or {}
        root = Path(params).resolve().parent
    profiles = raw.pop("profiles", {}) or {}
    chosen = profile or os.environ.get("MTL_PROFILE") or raw.pop("profile", None) or "default"
    raw.pop("profile", None)
    if chosen != "default" and chosen not in profiles:
        raise ValueError(f"unknown profile {chosen!r}; params.yaml defines {sorted(profiles) or 'none'}")
    profile_tree = copy.deepcopy(profiles.get(chosen, {}) or {})
    if chosen != "default" and "production" not in profile_tree:  # whether its models may become champion
        raise ValueError(f"profile {chosen!r} must say `production: true` or `production: false` (may its "
                         "models become champion?)")
    dropped = [name for name, spec in (raw.get("tasks") or {}).items() if spec is None]
    for name in dropped:  # `nsp: null` at the top level is not undone by the profile's own `nsp:` entry
        (profile_tree.get("tasks") or {}).pop(name, None)
    merged = deep_merge(raw, profile_tree)
    overrides = dict(overrides or {})
    indexed = {k: overrides.pop(k) for k in list(overrides) if any(part.isdigit() for part in k.split("."))}
    merged = deep_merge(merged, _dotted(overrides))
    dropped += [name for name, spec in (merged.get("tasks") or {}).items() if spec is None]
    for name in dropped:  # a dropped task takes the thresholds written for it along
        ((merged.get("gates") or {}).get("thresholds") or {}).pop(name, None)

    base = Config().model_dump(mode="python")
    base["training"]["stages"] = None  # resolved after the merge, by whether the encoder is pretrained
    if merged.pop("tasks_replace", False):
        base["tasks"] = {}
    base["root"] = root
    # A task defined in params.yaml that is not a default starts from nothing (its `type` is needed).
    tasks = merged.pop("tasks", {}) or {}
    for name, spec in tasks.items():
        if spec is None:  # `name: null` removes a default task
            base["tasks"].pop(name, None)
        elif name in base["tasks"]:
            base["tasks"][name] = deep_merge(base["tasks"][name], spec)
        else:
            base["tasks"][name] = spec
    # The default gates follow the task set: a dropped task takes its default thresholds with it. Thresholds
    # that params.yaml names for a task that is not configured are an error (Config._names, which
    # also drops the default thresholds of absent tasks when a Config is built directly).
    base["gates"]["thresholds"] = {t: v for t, v in base["gates"]["thresholds"].items() if t in base["tasks"]}
    # Lists (stages) replace as a whole; dicts merge.
    full = deep_merge(base, merged)
    full["profile"] = chosen  # what made this configuration, never a key to set
    if "root" in merged:
        full["root"] = root / merged["root"]
    if indexed:  # keys into lists (`training.stages.1.weighting=pcgrad`) edit the resolved stage list
        if full["training"].get("stages") is None:
            pretrained = (full.get("encoder") or {}).get("pretrained")
            tasks = {n: TaskConfig.model_validate(t) for n, t in full["tasks"].items()}
            full["training"]["stages"] = [s.model_dump() for s in (pretrained_stages() if pretrained
                                                                   else scratch_stages(tasks))]
        for dotted_key, value in indexed.items():
            _set_path(full, dotted_key, value)
    cfg = Config.model_validate(full)
    return cfg


def _set_path(tree: dict, dotted_key: str, value: Any) -> None:
    """Set `a.0.b` in nested dicts and lists; a list index must exist."""
    *parents, leaf = dotted_key.split(".")
    node: Any = tree
    for part in parents:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {dotted_key!r}: no item {part} in a list of {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        if not leaf.isdigit() or int(leaf) >= len(node):
            raise ValueError(f"override {dotted_key!r}: no item {leaf} in a list of {len(node)}")
        node[int(leaf)] = value
    else:
        node[leaf] = value
