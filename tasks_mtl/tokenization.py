"""Tokenizer (built from the corpus or loaded from a local BERT) and the Arrow cache of tokenized splits.

The small-BERT tokenizer is a WordPiece vocabulary of the training text (`corpus_vocabulary`: every character,
then the most frequent longer words) with the BERT pre-tokenizer that splits every CJK character into its own
token, as bert-base-chinese does; other Latin words and digits become character pieces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks_mtl.config import Config
from tasks_mtl.fingerprint import files_hash, fingerprint

TOKENIZER_DIR = "tokenizer"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# What a local Hugging Face BERT directory holds (bert-base-chinese's layout): one of each group. The older
# pytorch_model.bin is a pickle: transformers reads it with torch.load(weights_only=True), which refuses any
# object but tensors and plain containers.
PRETRAINED_FILES = (
    ("config.json",),
    ("vocab.txt", "tokenizer.json"),
    ("model.safetensors", "model.safetensors.index.json",  # weights, whole or sharded
     "pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def require_local_model(path: Path) -> Path:
    """`path` if it is a local BERT directory with a config, a vocabulary and weights; else one error that
    names what is missing (before transformers reports it as a hub lookup or a tokenizer backend problem)."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"encoder.pretrained: {path} is not a directory; give a local Hugging Face BERT directory "
            "(nothing is downloaded) or remove encoder.pretrained to build a small BERT from config"
        )
    missing = [" or ".join(group) for group in PRETRAINED_FILES
               if not any((path / name).is_file() for name in group)]
    if missing:
        raise FileNotFoundError(
            f"encoder.pretrained: {path} has no {'; no '.join(missing)}. A local Hugging Face BERT "
            "directory holds config.json, vocab.txt and model.safetensors (or pytorch_model.bin), as "
            "bert-base-chinese does"
        )
    return path


def training_texts(cfg: Config, tasks: list[str] | None = None) -> list[str]:
    """Every distinct train-split text of every task (token rows joined): the corpus the vocabulary is
    learnt from. NER, segmentation and POS share their sentences, so duplicates are dropped first."""
    from tasks_mtl.data.prepare import read_split

    texts: dict[str, None] = {}
    for name in cfg.tasks if tasks is None else tasks:
        for row in read_split(cfg, name, "train"):
            if "tokens" in row:
                texts["".join(row["tokens"])] = None
            else:
                texts[row["text"]] = None
                if row.get("text_pair"):
                    texts[row["text_pair"]] = None
    return list(texts)


def build_tokenizer(cfg: Config):
    """A BertTokenizerFast: loaded from encoder.pretrained, or trained as WordPiece on the training text."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if cfg.encoder.pretrained is not None:
        path = require_local_model(cfg.path(cfg.encoder.pretrained))
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    from tokenizers import BertWordPieceTokenizer

    options = {"clean_text": True, "handle_chinese_chars": True, "strip_accents": False, "lowercase": True}
    splitter = BertWordPieceTokenizer(**options)._tokenizer  # the normalizer and pre-tokenizer the vocabulary serves
    vocab = corpus_vocabulary(training_texts(cfg), splitter, cfg.encoder.vocab_size, cfg.encoder.vocab_min_frequency)
    wordpiece = BertWordPieceTokenizer(vocab=vocab, **options)
    return BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=True, tokenize_chinese_chars=True,
                             model_max_length=cfg.encoder.max_positions)


def corpus_vocabulary(texts: list[str], splitter, size: int, min_frequency: int) -> dict[str, int]:
    """A WordPiece vocabulary of the corpus, the same for the same texts: the special tokens, every character
    (each CJK character is a word of its own; a character inside a longer word also as `##c`), then the
    most frequent words of two or more characters seen `min_frequency` times, up to `size` entries. Ties go by
    the text itself. tokenizers' WordPiece trainer breaks its ties by hash order, so two builds from the same
    corpus differed (7,797 to 7,804 entries, 1,775 ids moved), and `dvc repro` could not repeat a run."""
    from collections import Counter

    normalize, split = splitter.normalizer.normalize_str, splitter.pre_tokenizer.pre_tokenize_str
    words = Counter(word for text in texts for word, _ in split(normalize(text)))
    pieces: Counter = Counter()
    for word, count in words.items():
        for i, ch in enumerate(word):
            pieces[ch] += count  # every character has an id of its own, wherever it occurs
            if i:
                pieces["##" + ch] += count
    by_count = lambda counts: sorted(counts, key=lambda key: (-counts[key], key))
    entries = [*SPECIAL_TOKENS, *by_count(pieces)]
    longer = Counter({w: n for w, n in words.items() if len(w) > 1 and n >= min_frequency})
    entries += by_count(longer)[: max(0, size - len(entries))]
    return {token: i for i, token in enumerate(entries)}


def build_ngram_tables(cfg: Config, tokenizer):
    """Bigrams of all training text (the encoder's bigram embeddings, window features) and trigrams of the
    texts of tasks whose heads read n-gram features (a bag, window features or window weights), as token-id
    keys; None when no part of the model uses them."""
    from tasks_mtl.ngrams import NgramTables

    bag_tasks = [n for n, t in cfg.tasks.items() if t.has_features()]
    if not (cfg.encoder.use_bigrams() or bag_tasks):
        return None
    encode = lambda texts: tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    vocab, least = len(tokenizer), cfg.encoder.ngram_min_count
    bigrams = NgramTables.build(encode(training_texts(cfg)), vocab, least, orders=(2,))
    trigrams = NgramTables.build(encode(training_texts(cfg, bag_tasks)), vocab, least, orders=(3,))
    return NgramTables(vocab, {2: bigrams.keys2, 3: trigrams.keys3})


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _inputs_hash(cfg: Config) -> str:
    """What the tokenized cache depends on: the prepared data, the tokenizer/task settings and the package
    source (tasks_mtl/fingerprint.py)."""
    prepared = cfg.path(cfg.data.prepared_dir)
    files = sorted(prepared.rglob("*.jsonl"), key=lambda f: f.relative_to(prepared).as_posix())
    return fingerprint(files_hash(files, prepared), encoder=cfg.encoder, tasks=dict(cfg.tasks))


def tokenize(cfg: Config, splits: tuple[str, ...] = ("train",)) -> Path:
    """Write the tokenizer and one Arrow dataset per task and split; skip when inputs are unchanged.

    Only train is tokenized by default: evaluation reads the prepared splits through the predictor,
    so it scores whole texts exactly as `mtl predict` does."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()

    from tasks_mtl.data.prepare import read_split
    from tasks_mtl.tasks import build_task

    out = cfg.path(cfg.data.tokenized_dir)
    key = _inputs_hash(cfg)
    meta_file = out / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("inputs") == key:
        return out
    if out.exists():
        shutil.rmtree(out)
    tokenizer = build_tokenizer(cfg)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    tables = build_ngram_tables(cfg, tokenizer)
    if tables is not None:
        tables.save(out)
    counts: dict[str, dict[str, int]] = {}
    for name, task_cfg in cfg.tasks.items():
        task = build_task(name, task_cfg)
        for split in splits:
            rows = read_split(cfg, name, split)
            columns = {k: [r.get(k) for r in rows] for k in task.input_columns}
            dataset = Dataset.from_dict(columns).map(
                lambda batch, task=task: task.encode(batch, tokenizer, cfg.encoder.max_length),
                batched=True,
                remove_columns=list(task.input_columns),
            )
            dataset.save_to_disk(str(out / name / split))
            counts.setdefault(name, {})[split] = len(dataset)
    meta_file.write_text(json.dumps({"inputs": key, "features": counts}, indent=1, sort_keys=True))
    return out
