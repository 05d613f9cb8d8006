"""Training throughput of this project's trainer against the transformers Trainer: one run, the same model,
the sentiment task, the same batch size; useful (non-pad) tokens per second.

Every variant trains on the sentiment train texts cut at 128 tokens, `--batch-size` rows per step, for
`--steps` optimizer steps, of which the first `--warmup-steps` are left out of the timing:

- project: `tasks_mtl.train.train_stage` on a one-stage config that trains only the sentiment task, from
  scratch, encoder trainable, at the trainer's default precision (`training.bf16` None: bf16 autocast where
  the CPU runs it natively), `batch_size` rows per batch (`training.batch_tokens` null), with the project's
  own model parts as configured ("project_extras": bigram embeddings, the head's pooling and TF-IDF scores).
  The stage stops after the warm-up steps (`stop_after`: its resume save) and is resumed to the end, so the
  `tokens_per_s` its log (`1-bench.log.csv`) records at the last step covers the timed steps only. The
  TF-IDF mix selection on validation that ends a last stage is off (`tfidf_select: false`): evaluation, not
  training.
- hf_padded: `transformers.Trainer` on `BertForSequenceClassification` of the same encoder sizes and
  vocabulary (the project's corpus tokenizer), every text padded to 128 as tutorials do (default collator),
  fp32;
- hf_grouped: the Trainer grouped by length (`group_by_length=True`; `train_sampling_strategy=
  "group_by_length"` in transformers 5) with dynamic padding (`DataCollatorWithPadding`), fp32;
- hf_best: grouped with `bf16=True`, the Trainer at its best on a CPU with native bf16 (elsewhere bf16 is
  emulated, far slower than fp32, and this is the fp32 run again).
  For the Trainer variants a callback times from the end of the last warm-up step to the end of the last step,
  and the useful tokens (attention-mask sums) of exactly the batches trained in between are counted.

Also measured: `matmul_gflops` and `matmul_bf16_gflops` (2048 x 2048 matmuls, timed after warm-up), each the best
of readings taken before the project's run, after it and after the Trainer's (`matmul_bf16_readings`): other load
on the host only ever lowers a reading (a single probe of 638 GFLOP/s, taken in a busy moment, once put the share
below at 41%, where the host's quiet ~830 gives 31%). And `project_train_gflops`: the project's useful-token rate
times 6 x the encoder's non-embedding (transformer layer) parameters plus 12 x layers x hidden x the mean useful
sequence length (attention, forward and backward) per token. The ratios project / each Trainer variant and
project_train_gflops / matmul_bf16_gflops (`project_share_of_bf16_peak`) are checked against "targets" (project >=
2x hf_grouped, >= 1.2x hf_best, >= 40% of the bf16 matmul rate) in a "meets" dict.

The data is tokenized into a scratch directory (the project's tokenizer and n-gram tables are rebuilt there
from the prepared train splits, ~1 minute), where every variant also trains: nothing is written to the
project's `tokenized/` or `checkpoints/`, and `prepared/` only when a task's train split is missing. Torch's
default thread count is kept. Another busy process on the same cores slows torch's threads far beyond its
share: compare "load_average" with "threads". One JSON line on stdout; everything else goes to stderr.

    python benchmarks/train_throughput.py --params params.yaml [--steps 40] [--batch-size 32]
    python benchmarks/train_throughput.py --profile quick --skip-hf   # the project's trainer and matmuls only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from host import matmul_gflops

from tasks_mtl.config import load_config
from tasks_mtl.data.prepare import prepare, read_split
from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer, tokenize

TASK = "sentiment"
MAX_LENGTH = 128  # every variant's texts are cut here (fewer tokens if the encoder has fewer positions)
TARGETS = {"project_vs_hf_grouped": 2.0, "project_vs_hf_best": 1.2, "project_share_of_bf16_peak": 0.4}


def bench_config(args, scratch: Path, max_length: int):
    """The one-stage sentiment config: scratch tokenized and output dirs, texts cut at `max_length` tokens,
    fixed row batches."""
    stage = {"name": "bench", "tasks": [TASK], "steps": args.steps}
    return load_config(args.params, profile=args.profile, overrides={
        "data.tokenized_dir": str(scratch / "tokenized"),
        "training.output_dir": str(scratch / "checkpoints"),
        "encoder.max_length": max_length,
        "training.batch_tokens": None,
        "training.batch_size": args.batch_size,
        "training.stages": [stage],
        "training.log_every": args.steps,
        "training.save_every": 0,
        f"tasks.{TASK}.tfidf_select": False,
    })


def run_project(cfg, steps: int, warmup: int) -> dict:
    """train_stage for `warmup` steps (stopped with its resume save), then resumed to `steps`: the log's
    tokens_per_s at the last step covers the resumed steps only."""
    from tasks_mtl.runlog import read_stage_log
    from tasks_mtl.train import train_stage

    paused = train_stage(cfg, 0, stop_after=warmup)
    if not (paused.name.endswith(".resume") and paused.exists()):
        raise RuntimeError(f"the stage did not stop after {warmup} steps with a resume save ({paused})")
    started = time.perf_counter()
    train_stage(cfg, 0)
    seconds = time.perf_counter() - started  # includes loading the resume save and the final checkpoint
    final = read_stage_log(cfg, 0)[steps]
    return {"tokens_per_s": final["tokens_per_s"], "bf16": bool(final.get("bf16", 0.0)),
            "resumed_stage_seconds": round(seconds, 1)}


def run_hf(variant: str, cfg, tokenizer, texts: list[str], labels: list[int], args, scratch: Path,
           bf16: bool = False) -> dict:
    """One transformers Trainer variant ("padded" or grouped by length), in fp32 or with `bf16=True`: useful
    tokens per second over the steps after the warm-up, and the padding it trained on."""
    import inspect

    from datasets import Dataset
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    padded = variant == "padded"
    enc = tokenizer(texts, truncation=True, max_length=cfg.encoder.max_length,
                    padding="max_length" if padded else False)
    dataset = Dataset.from_dict({**{k: list(v) for k, v in enc.items()}, "labels": labels})
    e = cfg.encoder
    torch.manual_seed(cfg.seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=e.hidden, num_hidden_layers=e.layers,
        num_attention_heads=e.heads, intermediate_size=e.intermediate,
        max_position_embeddings=e.max_positions, hidden_dropout_prob=e.dropout,
        attention_probs_dropout_prob=e.dropout, pad_token_id=tokenizer.pad_token_id,
        num_labels=len(cfg.tasks[TASK].labels),
    ))

    options = {"output_dir": str(scratch / f"hf-{variant}{'-bf16' if bf16 else ''}"),
               "per_device_train_batch_size": args.batch_size, "max_steps": args.steps, "learning_rate": 5e-5,
               "report_to": [], "save_strategy": "no", "logging_strategy": "no", "use_cpu": True,
               "dataloader_num_workers": 0, "disable_tqdm": True, "seed": cfg.seed, "bf16": bf16}
    if not padded:  # transformers 5 replaced group_by_length by train_sampling_strategy
        if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
            options["train_sampling_strategy"] = "group_by_length"
        else:
            options["group_by_length"] = True
    training_args = TrainingArguments(**options)

    batches: list[tuple[int, int]] = []  # (useful tokens, padded tokens) of each batch trained, in order
    clock: dict[str, float | int] = {}

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            mask = inputs["attention_mask"]
            batches.append((int(mask.sum()), mask.numel()))
            return super().training_step(model, inputs, *rest, **kwargs)

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup_steps:
                clock["start"], clock["first"] = time.perf_counter(), len(batches)
            elif state.global_step == args.steps:
                clock["end"], clock["last"] = time.perf_counter(), len(batches)

    collator = default_data_collator if padded else DataCollatorWithPadding(tokenizer, return_tensors="pt")
    trainer = CountingTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                              callbacks=[Clock()])
    trainer.train()
    timed = batches[clock["first"]:clock["last"]]
    useful, total = sum(u for u, _ in timed), sum(t for _, t in timed)
    seconds = clock["end"] - clock["start"]
    return {"tokens_per_s": useful / seconds, "timed_batches": len(timed), "useful_tokens": useful,
            "padding_share": round(1 - useful / total, 3), "seconds": round(seconds, 2),
            "bf16": bf16, "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("datasets").setLevel(logging.ERROR)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def flops_per_token(cfg, tokenizer) -> dict:
    """Training FLOPs per useful token: 6 x the encoder's transformer-layer parameters, plus attention forward
    and backward, 12 x layers x hidden x the mean useful length of the task's train rows (as tokenized)."""
    from datasets import load_from_disk

    from tasks_mtl.model import new_encoder

    encoder = new_encoder(cfg, len(tokenizer), tokenizer.pad_token_id)
    layer_params = sum(p.numel() for p in encoder.encoder.parameters())
    rows = load_from_disk(str(cfg.path(cfg.data.tokenized_dir) / TASK / "train"))
    lengths = [len(ids) for ids in rows["input_ids"]]
    mean_length = sum(lengths) / len(lengths)
    c = encoder.config
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
            "intermediate": c.intermediate_size, "vocab": len(tokenizer), "layer_params": layer_params,
            "mean_useful_length": mean_length,
            "flops": 6 * layer_params + 12 * c.num_hidden_layers * c.hidden_size * mean_length}


def measure(args) -> dict:
    """Every measurement of the run, in a scratch directory; the JSON line's fields."""
    from tasks_mtl.model import bf16_fast

    cpu_bf16 = bf16_fast(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        scratch = Path(tmp)
        base = load_config(args.params, profile=args.profile)
        if base.encoder.pretrained is not None:
            raise SystemExit(f"profile {args.profile!r} loads a pretrained encoder "
                             f"({base.encoder.pretrained}); this benchmark trains a small BERT from scratch")
        prepared = base.path(base.data.prepared_dir)
        if not all((prepared / task / "train.jsonl").exists() for task in base.tasks):
            prepare(base)  # the tokenizer is learnt from every task's train split
        cfg = bench_config(args, scratch, min(MAX_LENGTH, base.encoder.max_positions))
        tokenize(cfg)  # the corpus tokenizer and n-gram tables as the project builds them, texts cut
        tokenizer = load_tokenizer(cfg.path(cfg.data.tokenized_dir) / TOKENIZER_DIR)
        model = flops_per_token(cfg, tokenizer)

        readings = {"fp32": [], "bf16": []}  # the peak is the best of them: other load only lowers a reading

        def probe() -> None:
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                readings[name].append(matmul_gflops(dtype))

        probe()
        project = run_project(cfg, args.steps, args.warmup_steps)
        probe()
        hf: dict[str, dict] = {}
        if not args.skip_hf:
            rows = read_split(cfg, TASK, "train")
            label_ids = {label: i for i, label in enumerate(cfg.tasks[TASK].labels)}
            texts, labels = [r["text"] for r in rows], [label_ids[r["label"]] for r in rows]
            hf["padded"] = run_hf("padded", cfg, tokenizer, texts, labels, args, scratch)
            hf["grouped"] = run_hf("grouped", cfg, tokenizer, texts, labels, args, scratch)
            # bf16 where the CPU runs it natively; elsewhere it is emulated far slower than fp32, and the
            # Trainer's best is the grouped fp32 run again
            hf["best"] = run_hf("grouped", cfg, tokenizer, texts, labels, args, scratch, bf16=cpu_bf16)
            probe()
        peak = {name: max(values) for name, values in readings.items()}

    project_gflops = project["tokens_per_s"] * model["flops"] / 1e9
    task, use_bigrams = cfg.tasks[TASK], cfg.encoder.use_bigrams()
    tokens_per_s = lambda v: hf[v]["tokens_per_s"] if v in hf else None
    result = {
        "benchmark": "train_throughput", "profile": args.profile, "task": TASK, "steps": args.steps,
        "warmup_steps": args.warmup_steps, "timed_steps": args.steps - args.warmup_steps,
        "batch_size": args.batch_size, "max_length": cfg.encoder.max_length,
        "threads": torch.get_num_threads(),
        "cpu_bf16_native": cpu_bf16, "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"), "python": platform.python_version(),
        "encoder": {k: v for k, v in model.items() if k not in ("flops", "mean_useful_length")},
        # what the project's model computes beyond the plain BERT classifier (the TF-IDF scores are not fitted
        # here: no features stage runs before this one)
        "project_extras": {"bigrams": use_bigrams, "bigram_dim": cfg.encoder.bigram_dim if use_bigrams else 0,
                           "pooling": task.pooling, "tfidf_scores": task.tfidf,
                           "encoder_loss": task.tfidf and task.encoder_loss, "ngram_bag": task.ngram_bag},
        "project_bf16": project["bf16"],
        "project_resumed_stage_seconds": project["resumed_stage_seconds"],
        "project_useful_tokens_per_s": round(project["tokens_per_s"]),
        "hf_padded_useful_tokens_per_s": _round(tokens_per_s("padded")),
        "hf_grouped_useful_tokens_per_s": _round(tokens_per_s("grouped")),
        "hf_best_useful_tokens_per_s": _round(tokens_per_s("best")),
        "hf_details": {v: {k: x for k, x in d.items() if k != "tokens_per_s"} for v, d in hf.items()},
        "matmul_gflops": round(peak["fp32"], 1),
        "matmul_bf16_gflops": round(peak["bf16"], 1),
        "matmul_bf16_readings": [round(value, 1) for value in readings["bf16"]],
        "mean_useful_length": round(model["mean_useful_length"], 1),
        "flops_per_useful_token": round(model["flops"]),
        "project_train_gflops": round(project_gflops, 2),
        "project_vs_hf_padded": ratio(project["tokens_per_s"], tokens_per_s("padded")),
        "project_vs_hf_grouped": ratio(project["tokens_per_s"], tokens_per_s("grouped")),
        "project_vs_hf_best": ratio(project["tokens_per_s"], tokens_per_s("best")),
        "project_share_of_fp32_peak": ratio(project_gflops, peak["fp32"]),
        "project_share_of_bf16_peak": ratio(project_gflops, peak["bf16"]),
        "targets": TARGETS,
    }
    result["meets"] = {k: (result[k] >= v if result[k] is not None else None) for k, v in TARGETS.items()}
    return result


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every variant")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step, every variant")
    parser.add_argument("--skip-hf", action="store_true", help="the project's trainer (and matmuls) only")
    args = parser.parse_args(argv)
    if not 0 < args.warmup_steps < args.steps:
        parser.error("--warmup-steps must be at least 1 and fewer than --steps")
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    quiet_libraries()
    on_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the scratch dir is removed
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():  # stdout: the JSON line only
            warnings.simplefilter("ignore")
            result = measure(args)
    finally:
        signal.signal(signal.SIGTERM, on_term)
    # another process busy on the same cores slows torch's threads far more than its share (they wait for each
    # other): a 1-minute load average well above `threads` means the figures are not this machine's
    result["load_average"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    result["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
