"""Training data for ``lora-fast train``: the default corpus, user files, tokenizer training, batching.

Default corpus: ``pydoc_data.topics`` — the help texts behind ``help('topics')``, ~460 KB of English technical
prose that ships with every CPython, so the first run needs no download. Its distinct topic texts (78 in CPython
3.11) are documents; a seeded shuffle puts ``val_fraction`` of them (at least one) in the validation split, so no
document is in both. Other files are split the same way (one document only: cut at a word boundary).

``--dataset`` may also be a plain-text file (documents = blank-line separated paragraphs), JSON lines (one object
per line, the ``text`` field), CSV/TSV (the ``text``/``Text`` column), or a ``datasets`` hub name (its ``train``
split, and its ``validation``/``test`` split when there is one). Classification reads CSV files with ``Label`` and
``Text`` columns: a directory holding ``train.csv``, ``validation.csv`` and optionally ``test.csv`` (the layout of
the SMS-spam tutorial), or one CSV split 70/10/20 as that tutorial does.

Tokenizer fallback: a byte-level BPE (GPT-2's scheme: bytes as the base alphabet, so no text is unknown) trained on
the training split with ``tokenizers``; its vocabulary size is the model's ``vocab_size`` at most (a small corpus
stops earlier, ~9k tokens for the default one), and ``<|endoftext|>`` is id 0, used as EOS and padding.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import torch

from lora_fast.train_args import ConfigError

EOS = "<|endoftext|>"
TEXT_EXTS = {".txt", ".text", ".md", ".rst"}
JSON_EXTS = {".jsonl", ".json", ".ndjson"}
CSV_EXTS = {".csv", ".tsv"}


def default_corpus() -> list[str]:
    """The ``pydoc_data.topics`` documents, in a fixed (sorted-key) order, duplicates removed (some topics share
    a text, e.g. ``if`` and ``else``: kept twice, one copy could land in each split)."""
    from pydoc_data.topics import topics

    return list(dict.fromkeys(topics[k].strip() for k in sorted(topics) if topics[k].strip()))


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in TEXT_EXTS | JSON_EXTS | CSV_EXTS or name.startswith((".", "/", "~")) \
        or "\\" in name or name.count("/") > 1


def _pick_column(fields, text_column: str | None, where: str, wanted=("text", "Text")) -> str:
    names = [text_column] if text_column else list(wanted)
    for n in names:
        if n in fields:
            return n
    raise ConfigError(f"{where}: no {' or '.join(repr(n) for n in names)} column/field (found {sorted(fields)[:10]})")


def _read_csv(path: Path) -> list[dict]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delim))


def read_text_file(path: Path, text_column: str | None = None) -> list[str]:
    """Documents of one local file (see the module docstring for the formats)."""
    ext = path.suffix.lower()
    if ext in JSON_EXTS:
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}: line {i} is not a JSON object")
            docs.append(str(obj[_pick_column(obj, text_column, f"{path} line {i}")]))
    elif ext in CSV_EXTS:
        rows = _read_csv(path)
        col = _pick_column(rows[0].keys(), text_column, str(path)) if rows else None
        docs = [r[col] or "" for r in rows]
    else:
        docs = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
    return [d.strip() for d in docs if d and d.strip()]


def _split_docs(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if len(docs) == 1:  # one document: cut it near (1 - val_fraction) at a whitespace
        text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        space = text.rfind(" ", 0, cut)
        cut = space if space > 0 else cut
        return [text[:cut].strip()], [text[cut:].strip()]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def _load_hub_texts(name: str, text_column: str | None) -> tuple[list[str], list[str] | None]:
    from lora_fast.train_model import hub_reachable

    try:
        import datasets
    except ImportError:
        raise ConfigError(f"dataset {name!r} is not a local file, and the `datasets` package is not installed") \
            from None
    if not hub_reachable():
        raise ConfigError(f"dataset {name!r} is not a local file and the Hugging Face hub is not reachable "
                          "(offline); pass a local file with --dataset")
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001  (datasets raises many types; the message says what went wrong)
        raise ConfigError(f"could not load dataset {name!r}: {str(e).splitlines()[0]}") from None
    if "train" not in ds:
        raise ConfigError(f"dataset {name!r} has no 'train' split (splits: {list(ds)})")
    col = _pick_column(ds["train"].column_names, text_column, f"dataset {name!r}")
    val_split = next((s for s in ("validation", "test") if s in ds), None)
    train = [t for t in ds["train"][col] if t and t.strip()]
    return train, ([t for t in ds[val_split][col] if t and t.strip()] if val_split else None)


def load_texts(dataset: str | None, text_column: str | None = None, val_fraction: float = 0.1,
               seed: int = 42) -> tuple[list[str], list[str], str]:
    """(train documents, validation documents, a description of the source).

    Raises:
        ConfigError: a missing, empty or malformed file; an unreachable hub dataset.
    """
    if dataset is None:
        train, val = _split_docs(default_corpus(), val_fraction, seed)
        return train, val, "pydoc_data.topics (Python standard library)"
    path = Path(dataset).expanduser()
    if path.is_dir():
        raise ConfigError(f"dataset {dataset!r} is a directory; give a text, JSON lines or CSV file")
    if path.is_file():
        docs = read_text_file(path, text_column)
        if not docs:
            raise ConfigError(f"dataset file {dataset!r} is empty (no text found)")
        train, val = _split_docs(docs, val_fraction, seed)
        return train, val, str(path)
    if _looks_like_path(dataset):
        raise ConfigError(f"dataset file {dataset!r} does not exist")
    train, val = _load_hub_texts(dataset, text_column)
    if not train:
        raise ConfigError(f"dataset {dataset!r} has no text in its train split")
    if val is None:
        train, val = _split_docs(train, val_fraction, seed)
    return train, val, f"datasets:{dataset}"


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts`` with at most ``vocab_size`` tokens; a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ConfigError(f"the model's vocab_size ({vocab_size}) is too small for a byte-level tokenizer (>= 257)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=1 << 30)


def lm_blocks(tokenizer, docs: list[str], max_length: int, split: str) -> torch.Tensor:
    """Token ids of ``docs`` joined by EOS and cut into full blocks: (n_blocks, max_length) int64.

    Raises ``ConfigError`` when the split holds fewer than ``max_length`` tokens (not even one block).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // max_length
    if n == 0:
        raise ConfigError(f"the {split} split has {len(ids)} tokens, fewer than max_length={max_length}; use more "
                          "text or a smaller --max_length")
    return torch.tensor(ids[: n * max_length], dtype=torch.long).view(n, max_length)  # (n_blocks, T)


# ---------------------------------------------------------------------------------------------- classification
def _label_ids(rows_by_split: dict, label_col: str) -> list[str]:
    labels = sorted({r[label_col].strip() for rows in rows_by_split.values() for r in rows})
    numeric = all(re.fullmatch(r"-?\d+", v) for v in labels)
    return sorted(labels, key=int) if numeric else labels


def load_classification(dataset: str | None, text_column: str | None = None, seed: int = 42):
    """CSV splits for sequence classification.

    Returns:
        ({split: (texts, label_ids)} for train, validation and (when present) test, label names in id order).
    """
    if dataset is None:
        raise ConfigError("--task classification needs --dataset: a directory with train.csv/validation.csv[/test.csv]"
                          " or one CSV file with Label and Text columns")
    path = Path(dataset).expanduser()
    if path.is_dir():
        files = {"train": path / "train.csv", "validation": path / "validation.csv", "test": path / "test.csv"}
        if not files["validation"].is_file() and (path / "val.csv").is_file():
            files["validation"] = path / "val.csv"
        for split in ("train", "validation"):
            if not files[split].is_file():
                raise ConfigError(f"classification dataset directory {dataset!r} has no {files[split].name}")
        rows = {s: _read_csv(f) for s, f in files.items() if f.is_file()}
    elif path.is_file():
        all_rows = _read_csv(path)
        random.Random(seed).shuffle(all_rows)
        n_train, n_val = int(0.7 * len(all_rows)), int(0.1 * len(all_rows))  # the tutorial's 70/10/20 split
        rows = {"train": all_rows[:n_train], "validation": all_rows[n_train:n_train + n_val],
                "test": all_rows[n_train + n_val:]}
    else:
        raise ConfigError(f"dataset {dataset!r} does not exist")
    for split, rs in rows.items():
        if not rs:
            raise ConfigError(f"classification dataset {dataset!r}: the {split} split is empty")
    first = rows["train"][0].keys()
    label_col = _pick_column(first, None, f"{dataset} (train)", wanted=("Label", "label"))
    text_col = _pick_column(first, text_column, f"{dataset} (train)")
    for split, rs in rows.items():
        if label_col not in rs[0] or text_col not in rs[0]:
            raise ConfigError(f"{dataset}: the {split} split lacks the {label_col!r}/{text_col!r} columns")
    names = _label_ids(rows, label_col)
    if len(names) < 2:
        raise ConfigError(f"classification dataset {dataset!r} has a single label {names}; need at least two")
    index = {n: i for i, n in enumerate(names)}
    out = {s: ([r[text_col] or "" for r in rs], [index[r[label_col].strip()] for r in rs]) for s, rs in rows.items()}
    return out, names


class ClassificationCollator:
    """Tokenise, truncate to ``max_length`` and right-pad a batch of (text, label) pairs."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch):
        texts, labels = zip(*batch, strict=True)
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],  # (B, T)
                "labels": torch.tensor(labels, dtype=torch.long)}  # (B,)
