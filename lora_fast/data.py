"""Training data for ``lora-fast train``: the default corpus, user files, tokenizer training, batching.

Default corpus: ``pydoc_data.topics`` — the help texts behind ``help('topics')``, ~460 KB of English technical
prose that ships with every CPython, so the first run needs no download. Its distinct topic texts (78 in CPython
3.11) are documents; whole documents, in a seeded order, go to the validation split until it holds ``val_fraction``
of the text by characters, so no document is in both (documents too large for that share: the largest one's tail is
cut off, at a whitespace near the cut point). Other files are split the same way; a text repeated in a file stays on
one side (all its copies in training, or once in validation); at least one document stays in training, whatever
the share.

``--dataset`` may also be a plain-text file (documents = blank-line separated paragraphs; CRLF and CR line ends read
as LF), JSON lines (one object per line, the ``text`` field, a string; a ``.json`` file may also hold one array of
such objects), CSV/TSV (the ``text``/``Text`` column; a header naming a column twice is refused), or a ``datasets``
hub name (its ``train`` split, and its ``validation``/``test`` split when there is one). Files must be UTF-8 (a
byte-order mark is accepted); a file with another extension is read as plain text when it is UTF-8 text, and refused
when it is binary (``data.parquet``). Classification reads CSV files with ``Label`` and ``Text`` columns: a
directory holding ``train.csv``, ``validation.csv`` and optionally ``test.csv`` (the layout of the SMS-spam
tutorial), or one CSV split (1 - val_fraction - 0.2) / val_fraction / 0.2 — the tutorial's 70/10/20 at the default
``--val_fraction 0.1``, every copy of a text on one side. Every row needs a non-empty text and label; the label set
is the training split's (a label seen only in validation/test is an error, not a new class), in sorted order unless
the model is already a classifier of these labels (its order).

Tokenizer fallback: a byte-level BPE (GPT-2's scheme: bytes as the base alphabet, so no text is unknown) trained on
the training split with ``tokenizers``; its vocabulary size is the model's ``vocab_size`` at most (a small corpus
stops earlier, ~9k tokens for the default one), and ``<|endoftext|>`` is id 0, used as EOS and padding.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import re
import warnings
from array import array
from collections import Counter
from fractions import Fraction
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
    hint = "; --text_column names another" if not text_column and "text" in wanted else ""
    raise ConfigError(f"{where}: no {' or '.join(repr(n) for n in names)} column/field (found {sorted(fields)[:10]})"
                      + hint)


SUPPORTED = ".txt/.md/.rst (plain text), .jsonl/.json/.ndjson (JSON lines), .csv/.tsv"


def read_utf8(path: Path) -> str:
    """The text of ``path`` (UTF-8, a leading byte-order mark dropped); ``ConfigError`` for binary or other
    encodings, naming the supported formats, instead of a ``UnicodeDecodeError`` traceback."""
    data = path.read_bytes()
    known = path.suffix.lower() in TEXT_EXTS | JSON_EXTS | CSV_EXTS
    try:
        if b"\x00" in data:  # valid UTF-8 can hold NUL bytes, text files do not: a binary file
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        what = f"is not UTF-8 text (line {line}, byte {e.start})" if known else \
            f"is binary, not text ({path.suffix or 'no extension'} is not a supported format)"
        raise ConfigError(f"{path} {what}; supported: {SUPPORTED}, UTF-8 encoded") from None


def _check_header(path: Path, fieldnames: list[str]) -> None:
    """Refuse a header that names a column twice (``text,title,text``): a row is a dict, so one of the two columns
    would be dropped silently (``csv.DictReader`` keeps the last), training on whichever one that is. Empty names
    (trailing delimiters of a spreadsheet export) may repeat: no column is ever read by an empty name."""
    dups = [n for n, k in Counter(n for n in fieldnames if n).items() if k > 1]
    if dups:
        raise ConfigError(f"{path}: the header names the column(s) {', '.join(map(repr, dups))} more than once "
                          f"({', '.join(fieldnames)}); rename or remove the extra column(s), so that each name is "
                          "one column")


def read_csv(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every data row of a CSV/TSV file (the header is line 1)."""
    import io

    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB per field is below a long document (C long on Windows)
    text = read_utf8(path)
    # strict: a quote that never closes (the file ends inside it) or closes before more text (`"Hi" she said`)
    # is an error; without it the first swallowed every later row into one field, the second dropped the quotes
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    try:
        fieldnames = reader.fieldnames  # the header, read here
    except csv.Error as e:
        raise _quote_error(path, text, reader, 1, e, None) from None
    _check_header(path, fieldnames or [])
    tabs = len(fieldnames or ()) - 1 if delim == "\t" else None  # a TSV row line: a first cell, then this many tabs
    out, line = [], 1
    for row in _strict_rows(path, text, reader, tabs):
        if None in row:  # DictReader's restkey: fields past the header's (an unquoted delimiter inside a text)
            sep = "a tab" if delim == "\t" else "','"
            raise ConfigError(f"{path}: the row on line {line + 1} has {len(reader.fieldnames) + len(row[None])} "
                              f"fields, the header {len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); "
                              f"quote fields that contain {sep} (\"Hello, world\")")
        out.append((line + 1, row))  # a row's first line (quoted fields may span several)
        if tabs is not None:  # lines inside one field shaped like this file's rows are rows an unclosed quote swallowed
            swallowed = max((_row_like(v.split("\n")[1:], tabs) for v in row.values() if isinstance(v, str)),
                            default=0)
            if swallowed >= 2:
                raise ConfigError(f"{path}: the row on line {line + 1} has a field opening a quote (\") that closes "
                                  f"only on line {reader.line_num}, taking in {swallowed} lines that look like rows; "
                                  "close the quote, or write the TSV without quoting")
        line = reader.line_num
    return out


def _row_like(lines: list[str], tabs: int) -> int:
    """How many of ``lines`` look like rows of a TSV file whose rows hold ``tabs`` tabs: a first cell (no leading
    whitespace), then exactly that many tabs."""
    return sum(bool(ln) and not ln[0].isspace() and ln.count("\t") == tabs for ln in lines)


def _strict_rows(path: Path, text: str, reader, tabs: int | None):
    """The rows of a strict ``csv.DictReader``, its quoting errors a ``ConfigError`` (``_quote_error``)."""
    while True:
        start = reader.reader.line_num + 1  # DictReader's own line_num lags on an error
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise _quote_error(path, text, reader, start, e, tabs) from None


def _quote_error(path: Path, text: str, reader, start: int, e: csv.Error, tabs: int | None) -> ConfigError:
    """A strict reader's error in the row on line ``start`` as one line naming it and the line the reader stopped
    at: a quote that never closes (with the lines it took in: in a TSV, those that look like rows), or one followed
    by more text."""
    stop = reader.reader.line_num
    if "end of data" in str(e):
        below = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[start:stop]  # as StringIO splits lines
        took = f"{_row_like(below, tabs)} lines that look like rows" if tabs is not None else f"{len(below)} lines"
        return ConfigError(f"{path}: the row on line {start} has a field opening a quote (\") that never closes (the "
                           f"file ends inside it, on line {stop}), taking in {took}; close the quote, or double a "
                           "quote inside a quoted field (\"\")")
    return ConfigError(f"{path}: the row on line {start} has a quoted field whose closing quote (\") on line {stop} is "
                       "followed by more text; quote the whole field and double the quotes inside it (\"\"), as "
                       "csv.writer and pandas write them")


def _json_docs(path: Path, text_column: str | None) -> list[str]:
    text = read_utf8(path)
    if text.lstrip().startswith("["):  # one JSON array of objects (what json.dump of a list writes)
        try:
            objs = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected JSON lines (one "
                              "object per line) or one array of objects") from None
        items = [(f"{path} item {i}", o) for i, o in enumerate(objs, 1)]
    else:
        items = []
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # a raw CR is never inside a JSON string
        for i, line in enumerate(lines, 1):  # not splitlines(): U+2028/U+0085 may sit inside strings
            if not line.strip():
                continue
            try:
                items.append((f"{path} line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {i} is not valid JSON ({e.msg}); expected JSON lines: one complete "
                                  "object per line (not pretty-printed)") from None
    docs = []
    for where, obj in items:
        if not isinstance(obj, dict):
            raise ConfigError(f"{where} is not a JSON object")
        col = _pick_column(obj, text_column, where)
        if not isinstance(obj[col], str):
            raise ConfigError(f"{where}: field {col!r} is {json.dumps(obj[col])[:40]}, expected a string")
        docs.append(obj[col])
    return docs


def read_text_file(path: Path, text_column: str | None = None) -> list[str]:
    """Documents of one local file (see the module docstring for the formats)."""
    ext = path.suffix.lower()
    if ext in JSON_EXTS:
        docs = _json_docs(path, text_column)
    elif ext in CSV_EXTS:
        rows = read_csv(path)
        col = _pick_column(rows[0][1].keys(), text_column, str(path)) if rows else None
        short = [ln for ln, r in rows if r[col] is None]  # a broken line: fewer fields than the header
        if short:
            raise ConfigError(f"{path}: the row on line {short[0]} has no {col!r} field (fewer fields than the "
                              f"header {', '.join(rows[0][1])})"
                              + (f"; {len(short) - 1} more such row(s)" if len(short) > 1 else ""))
        docs = [r[col] for _, r in rows]
    else:
        if text_column:  # a plain-text file has no columns: the option would be ignored silently
            raise ConfigError(f"--text_column {text_column!r} is for JSON lines and CSV files; {path} is plain text "
                              "(documents are blank-line separated paragraphs)")
        docs = _paragraphs(read_utf8(path))
    return [d.strip() for d in docs if d and d.strip()]


def _paragraphs(text: str) -> list[str]:
    """The blank-line separated paragraphs of a plain-text file, its line ends made ``\\n`` first (universal
    newlines, as ``open()`` reads text): the same corpus saved on Windows (CRLF) kept ``\\r`` in every document,
    which the BPE tokenizer learned as text, and one saved with classic-Mac CR line ends was a single document.
    Only here: CSV keeps its own line-end rules (a quoted field's line breaks are its text), and
    ``_json_docs`` splits on every line end itself."""
    return re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n"))


def _cut(text: str, fraction: float) -> tuple[str, str]:
    """``text`` cut at ``1 - fraction`` of its length: (head, tail). At the nearest whitespace (a space, a line
    break, U+3000) within a window of max(200 characters, 2 % of the text) before or after that point, else at the
    point itself: text with few spaces (Chinese, Japanese, code) is cut where the share says, not at a space far
    back (one space in a title put nearly all the text in the tail)."""
    text = text.strip()  # a hub text may end in whitespace: the search below must not cut there
    n = len(text)
    cut = min(max(int(n * (1 - fraction)), 1), n - 1) if n > 1 else n
    window = max(200, n // 50)
    before = [m.start() for m in re.finditer(r"\s", text[max(1, cut - window):cut])]
    after = re.search(r"\s", text[cut:cut + window])
    options = [max(1, cut - window) + before[-1]] if before else []
    options += [cut + after.start()] if after and cut + after.start() > 0 else []
    if options:
        cut = min(options, key=lambda i: abs(i - cut))
    return text[:cut].strip(), text[cut:].strip()


def _split_docs(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) documents. Distinct texts are split (``_pick_validation``), so a text that repeats stays
    on one side: every copy goes to training, or validation holds it once (a record in both splits would make the
    eval loss optimistic). Both sides keep the input order (validation: the documents picked, in the input's
    order, then a cut document's tail): the blocks a capped ``--eval_batches`` reads follow the file."""
    distinct = list(dict.fromkeys(docs))
    val_idx, cut = _pick_validation(distinct, val_fraction, seed)
    in_val = {distinct[i] for i in val_idx}
    heads = {distinct[cut[0]]: cut[1]} if cut else {}  # a cut document's training part, for each of its copies
    train = [heads.get(d, d) for d in docs if d not in in_val]
    val = [distinct[i] for i in sorted(val_idx)] + ([cut[2]] if cut else [])
    return SplitDocs(train, val_fraction), SplitDocs(val, val_fraction)


class SplitDocs(list):
    """Documents of one side of a split that ``_split_docs`` made, with the ``val_fraction`` it held out: a list,
    so every caller reads it as before, which also lets ``lm_blocks`` tell a split too short for one block because
    validation took its share of the text (the cure is --val_fraction) from text that is short itself (it said
    "use more text" to a run that asked for 90 % validation)."""

    def __init__(self, docs, val_fraction: float):
        super().__init__(docs)
        self.val_fraction = val_fraction


def _pick_validation(docs: list[str], val_fraction: float, seed: int) -> tuple[list[int], tuple | None]:
    """Whole documents, in a seeded order, go to validation until they hold ``val_fraction`` of the text (by
    characters: one long document among short ones must not take most of the data). A document that would
    overshoot the share by a fifth is passed over; when no combination comes near (a few large documents, or one),
    the largest training document's tail makes up the rest (``_cut``). The last training document is never taken
    whole: a high share of a few documents (0.9 of two) put them all in validation, leaving training empty. Returns
    (validation indices, None or (index of the cut document, its head, its tail))."""
    if len(docs) == 1:
        return [], (0, *_cut(docs[0], val_fraction))
    target = val_fraction * sum(map(len, docs))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val, chars = [], 0
    for i in order:
        if chars >= target or len(val) == len(docs) - 1:  # the share is met, or one training document is left
            break
        if chars + len(docs[i]) <= 1.2 * target:
            val.append(i)
            chars += len(docs[i])
    if chars >= 0.5 * target:
        return val, None
    j = max(sorted(set(order) - set(val)), key=lambda k: len(docs[k]))  # nothing fits: cut the largest
    return val, (j, *_cut(docs[j], (target - chars) / len(docs[j])))


@contextlib.contextmanager
def _datasets_offline(on: bool):
    """datasets' offline switch for a block (read at its import, so the environment variable alone would come too
    late), with huggingface_hub's (``train_model._offline``): ``load_dataset`` then takes the cached copy without
    asking the hub."""
    import datasets

    from lora_fast.train_model import _offline

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = saved or on
    try:
        with _offline(on):
            yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _load_hub_texts(name: str, text_column: str | None) -> tuple[list[str], list[str] | None]:
    from lora_fast.train_model import hub_reachable

    try:
        import datasets
    except ImportError:
        raise ConfigError(f"dataset {name!r} is not a local file, and the `datasets` package is not installed "
                          "(pip install 'lora-fast[train]')") from None
    online = hub_reachable()
    path, _, config = name.partition(":")  # "wikitext:wikitext-2-raw-v1": a dataset and its configuration
    try:
        with _datasets_offline(not online):  # offline: the copy in datasets' cache (downloaded on a login node)
            ds = datasets.load_dataset(path, config or None)
    except Exception as e:  # noqa: BLE001  (datasets raises many types; the message says what went wrong)
        if not online:
            raise ConfigError(f"dataset {name!r} is not a local file, the Hugging Face hub is not reachable "
                              f"(offline) and datasets' cache has no copy ({str(e).splitlines()[0]}); pass a local "
                              "file with --dataset") from None
        raise ConfigError(f"could not load dataset {name!r}: {str(e).splitlines()[0]}") from None
    if "train" not in ds:
        raise ConfigError(f"dataset {name!r} has no 'train' split (splits: {list(ds)})")
    col = _pick_column(ds["train"].column_names, text_column, f"dataset {name!r}")
    feature = ds["train"].features[col]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ConfigError(f"dataset {name!r}: column {col!r} holds {feature}, not text; name a string column with "
                          "--text_column")
    val_split = next((s for s in ("validation", "test") if s in ds), None)
    if val_split and (col not in ds[val_split].column_names
                      or getattr(ds[val_split].features[col], "dtype", None) not in ("string", "large_string")):
        warnings.warn(f"dataset {name!r}: its {val_split!r} split has no text column {col!r} (columns: "
                      f"{ds[val_split].column_names[:10]}); validation is split off the train split instead",
                      stacklevel=2)
        val_split = None
    train = [t for t in ds["train"][col] if t and t.strip()]
    val = [t for t in ds[val_split][col] if t and t.strip()] if val_split else []
    return train, (val or None)  # a split without text: validation is taken from train, as for files


def load_texts(dataset: str | None, text_column: str | None = None, val_fraction: float = 0.1,
               seed: int = 42) -> tuple[list[str], list[str], str]:
    """(train documents, validation documents, a description of the source).

    Raises:
        ConfigError: a missing, empty or malformed file; an unreachable hub dataset.
    """
    if dataset is None:
        if text_column:
            raise ConfigError(f"--text_column {text_column!r} needs --dataset (the default corpus has no columns)")
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
    if path.exists():  # a pipe or a device: /dev/stdin, <(cat f)
        raise ConfigError(_not_a_file(dataset))
    if _looks_like_path(dataset):
        raise ConfigError(f"dataset file {dataset!r} does not exist")
    train, val = _load_hub_texts(dataset, text_column)
    if not train:
        raise ConfigError(f"dataset {dataset!r} has no text in its train split")
    if val is None:
        train, val = _split_docs(train, val_fraction, seed)
    return train, val, f"datasets:{dataset}"


def _not_a_file(dataset: str) -> str:
    """The error for a --dataset that exists but is neither a file nor a directory (it was "does not exist")."""
    return (f"dataset {dataset!r} is not a regular file (a pipe or a device, such as /dev/stdin or a shell's "
            "<(...)); save the data to a file and give that")


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


def separator_id(tokenizer) -> int | None:
    """The token put between documents: EOS, else SEP (BERT-style tokenizers have no EOS), else None."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def lm_blocks(tokenizer, docs: list[str], max_length: int, split: str, chunk: int = 1000) -> torch.Tensor:
    """Token ids of ``docs``, each encoded as the tokenizer encodes a text (its special tokens included, as HF's
    ``run_clm`` tokenizes: a Llama/Mistral/Gemma tokenizer's BOS opens every document, GPT-2's adds nothing),
    concatenated with one EOS (``separator_id``) after each — none added where the encoding already ends with it
    (BERT-style ``[CLS] … [SEP]``) or the next one opens with it (OPT's BOS is its EOS) — and cut into full
    blocks: (n_blocks, max_length) int64.

    Tokenized ``chunk`` documents at a time into an int64 buffer: one call over the whole corpus kept every token
    as a Python int in lists (about 165 bytes per token, a review measured; wikitext-103's 120M tokens ~ 18 GiB).

    Raises ``ConfigError`` when the split holds fewer than ``max_length`` tokens (not even one block), or the
    tokenizer has no separator.
    """
    eos = separator_id(tokenizer)
    if eos is None:
        raise ConfigError("the tokenizer has no EOS (or SEP) token to put between documents")
    ids = array("q")  # int64, 8 bytes a token
    for i in range(0, len(docs), chunk):
        # verbose=False: no "longer than the model's maximum ... indexing errors" warning for a long document: the
        # blocks below are max_length tokens each
        enc = tokenizer(docs[i:i + chunk], verbose=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        for doc in enc:  # one separator between documents: none where one ends or the next opens with it
            if ids and ids[-1] != eos and doc[:1] != [eos]:  # (OPT's, and GPT-2's with add_bos_token: BOS is EOS)
                ids.append(eos)
            ids.extend(doc)
        del enc
    if ids and ids[-1] != eos:
        ids.append(eos)  # the last document closed as the others
    n = len(ids) // max_length
    if n == 0:
        raise ConfigError(f"the {split} split has {len(ids)} tokens, fewer than max_length={max_length}; use more "
                          f"text{_val_fraction_hint(docs, split)} or a smaller --max_length")
    return torch.frombuffer(ids, dtype=torch.long)[: n * max_length].clone().view(n, max_length)  # (n_blocks, T)


def _val_fraction_hint(docs: list[str], split: str) -> str:
    """", a smaller --val_fraction (...)" when ``docs`` is one side of a split of the training text (``SplitDocs``;
    "a larger" for validation): a split short of one block there may be short because of the share, not the data.
    Nothing for lists given otherwise (a hub dataset's own validation split: --val_fraction plays no part)."""
    share = getattr(docs, "val_fraction", None)
    if share is None:
        return ""
    return f", {'a larger' if split == 'validation' else 'a smaller'} --val_fraction (validation took {share:g} of " \
        "the text)"


# ---------------------------------------------------------------------------------------------- classification
def _sort_labels(labels) -> list[str]:
    labels = sorted(labels)
    return sorted(labels, key=int) if all(re.fullmatch(r"-?\d+", v) for v in labels) else labels


def _check_rows(rows, name: str, label_col: str, text_col: str) -> None:
    """Every row of one CSV file has a non-empty text and label; the error names the file and line."""
    for line, r in rows:
        if label_col not in r or text_col not in r:
            raise ConfigError(f"{name} lacks the {label_col!r}/{text_col!r} columns (found {sorted(r)[:10]})")
        for col in (label_col, text_col):
            if r[col] is None or not r[col].strip():
                raise ConfigError(f"{name} line {line}: {'missing' if r[col] is None else 'empty'} {col!r}; every "
                                  "row needs a label and a non-empty text")


def load_classification(dataset: str | None, text_column: str | None = None, seed: int = 42,
                        val_fraction: float = 0.1):
    """CSV splits for sequence classification.

    Args:
        dataset: a directory with train.csv, validation.csv (or val.csv) and optionally test.csv; or one CSV file,
            split (1 - val_fraction - 0.2) / val_fraction / 0.2 after a seeded shuffle (test share fixed at 20 %).
        text_column: the text column (default ``text`` or ``Text``); the label column is ``Label`` or ``label``.
        seed: seed of the shuffle of a single file.
        val_fraction: validation share of a single file.

    Returns:
        ({split: (texts, label_ids)} for train, validation and (when present) test, label names in id order).

    Raises:
        ConfigError: a missing file or split, a row without text or label (file and line named), fewer than two
        labels in train, or labels in validation/test that the training split lacks.

    A directory's validation/test rows whose text the train split also holds are counted in a warning.
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
        files = {s: f for s, f in files.items() if f.is_file()}
        checks = {f"{f} ({s} split)": read_csv(f) for s, f in files.items()}
        rows = dict(zip(files, checks.values(), strict=True))
    elif path.is_file():
        if path.suffix.lower() in TEXT_EXTS | JSON_EXTS | {".parquet"}:  # read as CSV: a quoting error
            raise ConfigError(f"--task classification reads CSV/TSV files with Label and Text columns (or a "
                              f"directory of train/validation[/test].csv); {dataset!r} is a {path.suffix} file")
        if not 0.0 < val_fraction < 0.8:
            raise ConfigError(f"val_fraction={val_fraction} leaves no training rows in the single classification "
                              f"file {dataset!r} (test takes 20 %): use a value in (0, 0.8)")
        all_rows = read_csv(path)
        checks = {str(path): all_rows}
        rows = None  # split below, once the text column is known
    else:
        raise ConfigError(_not_a_file(dataset) if path.exists() else f"dataset {dataset!r} does not exist")
    for name, rs in checks.items():
        if not rs:
            raise ConfigError(f"classification dataset {name} has no rows")
    first = next(iter(checks.values()))[0][1].keys()
    label_col = _pick_column(first, None, f"{dataset} (train)", wanted=("Label", "label"))
    text_col = _pick_column(first, text_column, f"{dataset} (train)")
    for name, rs in checks.items():
        _check_rows(rs, name, label_col, text_col)
    given = rows is not None
    if rows is None:
        rows = _split_rows(all_rows, text_col, val_fraction, seed)
    for split, rs in rows.items():
        if not rs:
            raise ConfigError(f"classification dataset {dataset!r}: the {split} split is empty (val_fraction="
                              f"{val_fraction}, test 20 % of {len(all_rows)} rows)")
    names = _sort_labels({r[label_col].strip() for _, r in rows["train"]})
    if len(names) < 2:
        raise ConfigError(f"classification dataset {dataset!r} has a single label {names} in its train split; "
                          "need at least two")
    index = {n: i for i, n in enumerate(names)}
    for split, rs in rows.items():
        unseen = _sort_labels({r[label_col].strip() for _, r in rs} - set(index))
        if unseen:
            one = ("; one file's split is by text, not by label, so a rare label can miss train: try another --seed, "
                   "or give train.csv/validation.csv/test.csv" if path.is_file() else "")
            raise ConfigError(f"classification dataset {dataset!r}: label(s) {unseen[:10]} of the {split} split do "
                              f"not occur in the train split (labels: {names[:10]}){one}")
    if given:
        _warn_shared_texts(rows, files, text_col)
    out = {s: ([r[text_col] for _, r in rs], [index[r[label_col].strip()] for _, r in rs]) for s, rs in rows.items()}
    return out, names


def _warn_shared_texts(rows: dict, files: dict, text_col: str) -> None:
    """A directory's splits are the user's: kept as given, but a validation/test text that is also a training text
    (stripped, compared exactly) is named in a warning — accuracy on it measures memory, not generalisation (one
    file's split keeps every copy of a text on one side, ``_split_rows``)."""
    seen = {r[text_col].strip() for _, r in rows["train"]}
    for split in ("validation", "test"):
        shared = [line for line, r in rows.get(split, ()) if r[text_col].strip() in seen]
        if shared:
            warnings.warn(f"{len(shared)} of the {len(rows[split])} rows of {files[split]} ({split} split) have a "
                          f"text that {files['train'].name} also holds (first at line {shared[0]}): their accuracy "
                          "measures memory, not generalisation", stacklevel=3)


def _split_rows(all_rows, text_col: str, val_fraction: float, seed: int) -> dict:
    """One CSV's rows in a seeded order, cut (1 − val_fraction − 0.2) / val_fraction / 0.2, a text's every copy on
    one side: copies in train and test made test accuracy a memory test (the SMS-spam file has ~400 repeated texts
    in 5 572). Without copies the cut is exact (the shares of the decimal given: in floats 0.7 · 90 is
    62.99999999999999); a repeated text moves the cut by its copies."""
    shuffled = list(all_rows)
    random.Random(seed).shuffle(shuffled)
    groups: dict[str, list] = {}
    for row in shuffled:  # in order of first appearance: without copies, the plain shuffled order
        groups.setdefault(row[1][text_col].strip(), []).append(row)
    share = Fraction(str(val_fraction))
    n_val = math.floor(share * len(all_rows))
    n_train = math.floor((Fraction(4, 5) - share) * len(all_rows))
    rows = {"train": [], "validation": [], "test": []}
    for group in groups.values():
        split = ("train" if len(rows["train"]) < n_train else
                 "validation" if len(rows["validation"]) < n_val else "test")
        rows[split] += group
    return rows


class ClassificationCollator:
    """Tokenise, truncate to ``max_length`` and right-pad a batch of (text, label) pairs (a module-level class:
    DataLoader workers on spawn platforms pickle it).

    Right, whatever the tokenizer's ``padding_side``: GPT-2 gets no ``position_ids``, so left padding would shift
    every real token's position by its row's padding, and a text's logits would depend on the batch it is in."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch):
        texts, labels = zip(*batch, strict=True)
        rows = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        ids = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}  # (B,)


def lm_collate(items) -> dict:
    """Batch of ``TensorDataset`` items (one (T,) block each) → ``{"input_ids", "labels"}`` (B, T); the model
    shifts the labels itself. Module-level, hence picklable for DataLoader workers."""
    ids = torch.stack([x[0] for x in items])  # (B, T)
    return {"input_ids": ids, "labels": ids}
