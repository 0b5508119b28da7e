"""Classification CSV loading (``lora_fast.data.load_classification``): the label set, its order, and the split of a
single CSV file into train / validation / test.

No model is involved: each test writes a few CSV rows and reads them back.
"""

from __future__ import annotations

import csv
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lora_fast.data import load_classification
from lora_fast.train_args import ConfigError
from tests.utils import MISSING


def _write_csv(path, rows, header=("Label", "Text")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _dir(root, train_rows, validation_rows):
    root.mkdir()
    _write_csv(root / "train.csv", train_rows)
    _write_csv(root / "validation.csv", validation_rows)
    return root


def test_a_single_label_is_refused(tmp_path):
    """A classifier needs at least two classes: a training split with one label is an error naming it, for a
    directory of splits and for one CSV file alike."""
    rows = [("spam", f"message {i}") for i in range(20)]
    with pytest.raises(ConfigError, match=r"has a single label \['spam'\] in its train split"):
        load_classification(str(_dir(tmp_path / "d", rows, rows[:3])))
    with pytest.raises(ConfigError, match="single label"):
        load_classification(str(_write_csv(tmp_path / "one.csv", rows)))


def test_labels_are_stripped_of_surrounding_spaces(tmp_path):
    """'ham ' and ' spam' (spaces left around a label by hand-edited CSVs) are the labels 'ham' and 'spam': two
    classes, not four, and every row gets the id of its stripped label."""
    train = [("ham ", "see you at lunch"), (" spam", "win cash now"), ("ham", "notes for the meeting"),
             ("spam", "free prize inside"), (" ham ", "dinner at home")]
    splits, names = load_classification(str(_dir(tmp_path / "d", train, [(" spam ", "claim your reward")])))
    assert names == ["ham", "spam"]
    texts, ids = splits["train"]
    assert [names[i] for i in ids] == [label.strip() for label, _ in train] and texts == [t for _, t in train]
    assert [names[i] for i in splits["validation"][1]] == ["spam"]


@pytest.mark.parametrize("ext", [".ndjson", ".rst", ".text", ".JSONL"])
def test_a_text_or_json_lines_file_is_refused_for_classification_by_any_of_its_extensions(tmp_path, ext):
    """.txt/.json/.jsonl/.md were refused with the formats classification reads; the other extensions the LM reader
    knows (.ndjson, .rst, .text) were read as CSV, and a JSON lines file said it had no 'Label' column, naming
    '{"label": 0' as one."""
    import json

    f = tmp_path / f"d{ext}"
    f.write_text("".join(json.dumps({"label": i % 2, "text": f"text {i}"}) + "\n" for i in range(20)))
    with pytest.raises(ConfigError, match=rf"reads CSV/TSV files with Label and Text columns .* is a \{ext} file"):
        load_classification(str(f))


def test_numeric_labels_sort_as_numbers(tmp_path):
    """Integer labels get ids in numeric order ("2" < "3" < "10"), so that label k of a 0..N-1 labelling is id k;
    a string sort would put "10" first."""
    train = [("2", "two"), ("10", "ten"), ("3", "three"), ("10", "ten again"), ("2", "two again")]
    splits, names = load_classification(str(_dir(tmp_path / "d", train, [("3", "three again")])))
    assert names == ["2", "3", "10"]
    assert [names[i] for i in splits["train"][1]] == [label for label, _ in train]
    labelled = _dir(tmp_path / "e", [(str(k % 12), f"row {k}") for k in range(24)], [("11", "eleven")])
    _, names = load_classification(str(labelled))
    assert names == [str(k) for k in range(12)]  # 0..11: names[k] is label k


@pytest.mark.parametrize("n, val_fraction", [(50, 0.1), (37, 0.25), (20, 0.3), (101, 0.05), (40, 0.5), (100, 0.29),
                                             (90, 0.1)])
def test_single_csv_split_sizes_and_partition(tmp_path, n, val_fraction):
    """One CSV file is split after a seeded shuffle into train (1 - val_fraction - 0.2), validation (val_fraction)
    and test (the rest, about 20 %): each split holds the whole rows that its exact share rounds down to, and the
    three splits partition the file's rows (every row once, with its own label)."""
    f = _write_csv(tmp_path / "rows.csv", [("spam" if i % 2 else "ham", f"message {i}") for i in range(n)])
    splits, names = load_classification(str(f), seed=3, val_fraction=val_fraction)
    share = Fraction(str(val_fraction))
    n_train, n_val = math.floor((Fraction(4, 5) - share) * n), math.floor(share * n)
    sizes = {s: len(texts) for s, (texts, _) in splits.items()}
    assert sizes == {"train": n_train, "validation": n_val, "test": n - n_train - n_val}
    rows = [(t, names[y]) for texts, ids in splits.values() for t, y in zip(texts, ids, strict=True)]
    assert sorted(rows) == sorted((f"message {i}", "spam" if i % 2 else "ham") for i in range(n))
    again, _ = load_classification(str(f), seed=3, val_fraction=val_fraction)
    assert again == splits  # the shuffle follows the seed


def test_single_csv_of_90_rows_splits_70_10_20(tmp_path):
    """The documented 70/10/20 split at the default val_fraction 0.1: 90 rows give 63 / 9 / 18 (float shares gave
    62 / 9 / 19: 0.7 * 90 is 62.99999999999999, truncated)."""
    f = _write_csv(tmp_path / "rows.csv", [("spam" if i % 2 else "ham", f"message {i}") for i in range(90)])
    for vf in (0.1, np.float64(0.1), np.float32(0.1)):  # numpy scalars from a Python caller too
        splits, _ = load_classification(str(f), seed=0, val_fraction=vf)
        assert {s: len(texts) for s, (texts, _) in splits.items()} == {"train": 63, "validation": 9, "test": 18}


def test_single_csv_keeps_every_copy_of_a_text_on_one_side(tmp_path):
    """1000 distinct messages and 80 copies of some: copies landed in train and test alike (27 of 216 test rows
    were verbatim training rows, a review measured), so test accuracy measured memory. Every text is now on one
    side; the shares stay near their targets."""
    rows = [("spam" if i % 2 else "ham", f"message {i}") for i in range(1000)]
    rows += [rows[i * 7] for i in range(80)]
    f = _write_csv(tmp_path / "rows.csv", rows)
    splits, _ = load_classification(str(f), seed=0, val_fraction=0.1)
    sides = {s: set(texts) for s, (texts, _) in splits.items()}
    assert not (sides["train"] & sides["validation"] or sides["train"] & sides["test"]
                or sides["validation"] & sides["test"])
    assert sum(len(t) for t, _ in splits.values()) == 1080
    assert abs(len(splits["test"][0]) - 216) <= 3 and abs(len(splits["validation"][0]) - 108) <= 3
    # copies that differ only by surrounding whitespace (a trailing space in the file) are one text too
    rows = [("spam" if i % 2 else "ham", f"message {i}{end}") for i in range(150) for end in ("", " ")]
    splits, _ = load_classification(str(_write_csv(tmp_path / "spaced.csv", rows)), seed=1, val_fraction=0.1)
    sides = {s: {t.strip() for t in texts} for s, (texts, _) in splits.items()}
    assert not (sides["train"] & sides["validation"] or sides["train"] & sides["test"]
                or sides["validation"] & sides["test"])


# ------------------------------------------------------------------------- causal-LM files: the split, CSV rows
def test_validation_share_holds_for_text_with_few_spaces():
    """The cut that makes up validation's share lands near the share, at a nearby whitespace or at the point itself:
    a Chinese text whose only ASCII space is in its title went 100 % to validation (it was cut at that space), and
    two such documents split 50/50 at --val_fraction 0.1."""
    from lora_fast.data import _split_docs

    para = "风从山谷里吹来，树叶沙沙作响，远处传来钟声。" * 20  # 440 characters, no whitespace
    novel = "第一章 风起\n" + "\n".join([para] * 40)  # one document: no blank line
    code = "\n".join(f"x{i}=f(y{i})+g(z{i})" for i in range(2000))  # line breaks, no spaces
    hub_text = para * 2 + "\n"  # hub texts are not stripped: the cut must not land on the trailing line break
    for docs in ([novel], [novel, novel.replace("第一章", "第二章")], [code], [hub_text]):
        train, val = _split_docs(docs, 0.1, seed=0)
        share = sum(map(len, val)) / sum(len(d.strip()) for d in docs)
        assert 0.09 <= share <= 0.11, share
        assert all(train) and all(val)
        assert sorted("".join(train + val).replace("\n", "").replace(" ", "")) == \
            sorted("".join(docs).replace("\n", "").replace(" ", ""))  # a partition of the text


def test_repeated_documents_stay_on_one_side(tmp_path):
    """A text repeated in the file (scraped or FAQ-style data) lands in one split: every copy in training, or once
    in validation (copies used to go to both, so validation measured text the model trained on)."""
    import json

    from lora_fast.data import load_texts

    texts = [(f"record {i} says " + "something useful " * (5 + i % 4)).strip() for i in range(50)]
    records = texts + texts[:25]  # 25 texts twice
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in records))
    for seed in range(4):
        train, val, _ = load_texts(str(f), val_fraction=0.2, seed=seed)
        assert not set(train) & set(val) and len(set(val)) == len(val)
        assert sorted(set(train) | set(val)) == sorted(set(texts))
        for t in set(train):  # a training text keeps all its copies
            assert train.count(t) == records.count(t)


@pytest.mark.parametrize("ext, row", [(".csv", "ham,Hello, how are you"), (".tsv", "ham\tHello\thow are you")])
def test_a_row_with_more_fields_than_the_header_is_refused(tmp_path, ext, row):
    """An unquoted delimiter inside a text gave the row extra fields, which were dropped silently ("Hello" trained,
    not "Hello, how are you"); pandas and datasets refuse such a file. Both readers name the line."""
    from lora_fast.data import load_texts

    sep = "\t" if ext == ".tsv" else ","
    f = tmp_path / f"d{ext}"
    f.write_text(f"Label{sep}Text\nspam{sep}\"win, now\"\n{row}\nham{sep}fine\n")
    with pytest.raises(ConfigError, match=r"row on line 3 has 3 fields, the header 2 \(Label, Text\); quote"):
        load_texts(str(f))
    root = tmp_path / f"cls{ext}"
    root.mkdir()
    (root / "train.csv").write_text("Label,Text\nspam,win\nham,Hello, how are you\n")
    (root / "validation.csv").write_text("Label,Text\nham,ok\n")
    with pytest.raises(ConfigError, match=r"train.csv: the row on line 3 has 3 fields"):
        load_classification(str(root))


def test_a_csv_row_short_of_the_text_field_is_an_error_naming_its_line(tmp_path):
    """A broken line (fewer fields than the header) used to vanish from the data silently; a row whose text is
    present but blank is an empty document, skipped as before."""
    from lora_fast.data import read_text_file

    path = tmp_path / "short.csv"
    path.write_text('id,text\n1,hello there world\n2\n3,"  "\n4,second doc here\n')
    with pytest.raises(ConfigError, match=r"short.csv: the row on line 3 has no 'text' field \(fewer fields than "
                       r"the header id, text\)"):
        read_text_file(path)
    path.write_text('id,text\n1,hello there world\n3,"  "\n4,second doc here\n')
    assert read_text_file(path) == ["hello there world", "second doc here"]


@pytest.mark.parametrize("ext", [".csv", ".tsv"])
def test_a_quote_that_never_closes_or_closes_before_more_text_is_refused(tmp_path, ext):
    """A field opening a quote that never closes swallowed every later row into one document (4 rows read as 1),
    and one whose closing quote is followed by more text lost its quotes ('"Hi" she said' trained as 'Hi she said'):
    both silently (pandas repairs them the same way); the reader is strict now, and the error names the lines."""
    from lora_fast.data import read_text_file

    sep = "\t" if ext == ".tsv" else ","
    f = tmp_path / f"d{ext}"
    f.write_text(f'id{sep}text\n1{sep}fine\n2{sep}"never closed\n3{sep}third row\n4{sep}fourth row\n')
    took = "2 lines that look like rows" if ext == ".tsv" else "2 lines"
    with pytest.raises(ConfigError, match=r"the row on line 3 has a field opening a quote \(\"\) that never closes "
                       rf"\(the file ends inside it, on line 5\), taking in {took}; close the quote"):
        read_text_file(f)
    f.write_text(f'id{sep}text\n1{sep}fine\n2{sep}"Hi" she said\n')
    with pytest.raises(ConfigError, match=r"the row on line 3 has a quoted field whose closing quote \(\"\) on line 3 "
                       r"is followed by more text; quote the whole field"):
        read_text_file(f)
    f.write_text(f'"id{sep}text\n1{sep}fine\n')  # in the header too: a one-line error, not csv.Error's traceback
    with pytest.raises(ConfigError, match=r"the row on line 1 has a field opening a quote"):
        read_text_file(f)
    with open(f, "w", newline="") as fh:  # what csv.writer writes of those texts still reads
        csv.writer(fh, delimiter=sep).writerows([["id", "text"], ["1", '"Hi" she said'], ["2", "two\nlines"]])
    assert read_text_file(f) == ['"Hi" she said', "two\nlines"]


PARAGRAPHS = ["first paragraph,\nits second line", "second paragraph", "third one,\n  indented line\nand a last"]


@pytest.mark.parametrize("eol", ["\r\n", "\r"])
def test_plain_text_with_windows_or_classic_mac_line_ends_reads_as_with_lf(tmp_path, eol):
    """The same corpus saved with CRLF (Windows) or CR (classic Mac) line ends gives the documents of its LF copy:
    CRLF kept a '\\r' in every document (the BPE tokenizer learned it), CR-only was one document, not three."""
    from lora_fast.data import load_texts, read_text_file

    lf = tmp_path / "lf.txt"
    lf.write_bytes(("\n\n".join(PARAGRAPHS) + "\n").encode())
    other = tmp_path / "other.txt"
    other.write_bytes(("\n\n".join(PARAGRAPHS) + "\n").replace("\n", eol).encode())
    docs = read_text_file(other)
    assert docs == read_text_file(lf) and len(docs) == len(PARAGRAPHS)
    assert not any("\r" in d for d in docs)
    assert load_texts(str(other), val_fraction=0.3, seed=1)[:2] == load_texts(str(lf), val_fraction=0.3, seed=1)[:2]


def test_a_csv_field_keeps_its_quoted_line_breaks(tmp_path):
    """CSV keeps its own line-end rules (read with newline=""): a quoted field's CRLF is part of its text, and rows
    written with csv.writer's CRLF terminator read as rows."""
    from lora_fast.data import read_text_file

    texts = ["one line", "two\r\nlines", "a lone\rcarriage return"]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("id", "text"), *((str(i), t) for i, t in enumerate(texts))])
    assert read_text_file(path) == texts


@pytest.mark.parametrize("n_docs", [2, 3])
def test_a_high_val_fraction_leaves_training_text(tmp_path, n_docs):
    """A high --val_fraction with few documents of similar size put every document in validation (the overshoot
    rule allows a fifth more than the share), leaving training empty and an error that advised more text. At least
    one document now stays in training, and the split is still a partition of the file's words."""
    from lora_fast.data import load_texts

    docs = [" ".join(f"d{k}w{i}" for i in range(40 + 3 * k)) for k in range(n_docs)]
    f = tmp_path / "few.txt"
    f.write_text("\n\n".join(docs) + "\n")
    for val_fraction in (0.5, 0.75, 0.9, 0.99):
        for seed in range(10):
            train, val, _ = load_texts(str(f), val_fraction=val_fraction, seed=seed)
            assert train and val, (val_fraction, seed)
            assert sorted(" ".join(train + val).split()) == sorted(" ".join(docs).split())


@pytest.mark.parametrize("ext, sep", [(".csv", ","), (".tsv", "\t")])
def test_a_header_naming_a_column_twice_is_refused(tmp_path, ext, sep):
    """``text,title,text``: csv.DictReader kept the last 'text' column silently (a stale copy trained, not the
    body); the file is refused, naming the column and the file, by the LM reader and the classification reader.
    Repeated empty names (a spreadsheet's trailing delimiters) name no column and still read."""
    from lora_fast.data import load_texts, read_text_file

    f = tmp_path / f"dup{ext}"
    f.write_text(sep.join(["text", "title", "text"]) + "\n" + sep.join(["the body", "T1", "stale copy"]) + "\n")
    with pytest.raises(ConfigError, match=rf"dup{ext}: the header names the column\(s\) 'text' more than once"):
        load_texts(str(f))
    one = _write_csv(tmp_path / "one.csv", [("spam", "win", "x"), ("ham", "hi", "y")] * 5, ("Label", "Text", "Label"))
    with pytest.raises(ConfigError, match=r"one.csv: the header names the column\(s\) 'Label' more than once"):
        load_classification(str(one))
    root = _dir(tmp_path / "d", [("spam", "win"), ("ham", "hi")], [("ham", "ok")])
    _write_csv(root / "validation.csv", [("ham", "ok", "again")], ("Label", "Text", "Text"))
    with pytest.raises(ConfigError, match=r"validation.csv: the header names the column\(s\) 'Text' more than once"):
        load_classification(str(root))
    f.write_text(sep.join(["id", "text", "", ""]) + "\n" + sep.join(["1", "the body", "", ""]) + "\n")
    assert read_text_file(f) == ["the body"]


@pytest.mark.parametrize("cached", [True, False])
def test_a_hub_dataset_is_taken_from_datasets_cache_when_the_hub_is_unreachable(monkeypatch, cached):
    """Offline (HF_HUB_OFFLINE=1 on a compute node, say) a hub name was refused before datasets was asked: now
    load_dataset runs in datasets' offline mode, which takes the cached copy; without one, the error says the hub
    is unreachable and the cache has none. (load_dataset is a stand-in here: no hub, no cache on this machine.)"""
    import datasets
    from huggingface_hub import constants

    from lora_fast import train_model
    from lora_fast.data import load_texts

    calls = []

    def fake_load(path, config=None):
        calls.append((path, config, datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
        if not cached:
            raise FileNotFoundError(f"Dataset {path} is not cached in /somewhere")
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"text": [f"document {i} " * 5 for i in range(20)]})})

    monkeypatch.setattr(train_model, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    offline_before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if cached:
        train, val, _ = load_texts("someone/corpus:cfg", val_fraction=0.1, seed=0)
        assert len(train) + len(val) == 20
    else:
        with pytest.raises(ConfigError, match=r"'someone/corpus:cfg' is not a local file, the Hugging Face hub is "
                           r"not reachable \(offline\) and datasets' cache has no copy \(Dataset someone/corpus is "
                           r"not cached"):
            load_texts("someone/corpus:cfg")
    assert calls == [("someone/corpus", "cfg", True, True)]  # asked in offline mode
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == offline_before  # and put back


def test_hub_validation_split_without_the_text_column_falls_back_to_a_split_of_train(monkeypatch):
    """A hub dataset whose validation split lacks the text column (other columns there) raised datasets' own
    ValueError, a traceback: now a warning names the split and validation is split off train."""
    import datasets

    from lora_fast import train_model
    from lora_fast.data import load_texts

    def fake_load(path, config=None):
        train = datasets.Dataset.from_dict({"text": [f"document {i} " * 5 for i in range(20)]})
        return datasets.DatasetDict({"train": train, "test": datasets.Dataset.from_dict({"body": ["x y z"]})})

    monkeypatch.setattr(train_model, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.warns(UserWarning, match=r"its 'test' split has no text column 'text' \(columns: \['body'\]\)"):
        train, val, _ = load_texts("someone/corpus", val_fraction=0.1, seed=0)
    assert val and len(train) + len(val) == 20 and not set(train) & set(val)


def test_a_one_step_loss_curve_draws_its_point(tmp_path, monkeypatch):
    """One training step (--max_steps 1, or a stop after step 1) is one point: drawn with a marker (a line alone
    drew nothing); longer curves stay lines."""
    from lora_fast import plots

    figs = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figs.append(fig))
    plots.loss_curve(tmp_path / "a.png", [3.2], [], [])
    plots.loss_curve(tmp_path / "b.png", [3.2, 3.1, 3.0], [2], [3.05])
    one, many = (fig.axes[0].lines[0] for fig in figs)
    assert one.get_marker() not in (None, "None", "", " ") and len(one.get_xdata()) == 1
    assert many.get_marker() in (None, "None", "", " ")


# ---------------------------------------------------------------------------------------------- LM blocks
DOCS = ["the cat sat on the mat", "", "a dog ran", "the mat was red and the cat was not"] * 3


def _word_tokenizer(template: str | None):
    """A word-level fast tokenizer whose post-processor adds ``template``'s special tokens (None: none, as GPT-2)."""
    pytest.importorskip("transformers", reason=MISSING["transformers"])
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for d in DOCS for w in d.split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
            (t, vocab[t]) for t in ("<s>", "</s>", "[CLS]", "[SEP]") if t in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"), vocab


@pytest.mark.parametrize("template, opens, closes", [
    (None, [], []),  # GPT-2: nothing added, EOS between documents
    ("<s> $A", ["<s>"], []),  # Llama / Mistral / Gemma: BOS opens every document (it was dropped)
    ("<s> $A </s>", ["<s>"], ["</s>"]),  # a tokenizer that closes with EOS itself: not doubled
    ("</s> $A", ["</s>"], []),  # OPT's (and GPT-2's with add_bos_token): the BOS is the EOS, not doubled
])
def test_lm_blocks_encode_each_document_as_the_tokenizer_does(template, opens, closes):
    """The blocks are the documents encoded as the tokenizer encodes a text (HF run_clm's way), each followed by
    EOS unless it already ends with it, concatenated; in chunks of any size."""
    from lora_fast.data import lm_blocks

    tokenizer, vocab = _word_tokenizer(template)
    eos, want = vocab["</s>"], []
    for d in DOCS:  # the oracle: the vocabulary by hand, one EOS between documents and at the end
        doc = [vocab[t] for t in opens] + [vocab[w] for w in d.split()] + [vocab[t] for t in closes]
        want += ([eos] if want and want[-1] != eos and doc[:1] != [eos] else []) + doc
    want += [] if want[-1] == eos else [eos]
    T = 5
    n = len(want) // T
    for chunk in (1, 3, 1000):
        got = lm_blocks(tokenizer, DOCS, T, "train", chunk=chunk)
        assert got.dtype == torch.long and got.shape == (n, T)
        assert got.flatten().tolist() == want[: n * T]
    # two documents (none empty, as load_texts gives them): one EOS between, never two
    got = lm_blocks(tokenizer, ["the cat", "a dog"], 1, "train").flatten().tolist()
    assert got == [vocab[t] for t in [*opens, "the", "cat", *closes]] + (
        [] if (closes or opens) == ["</s>"] else [vocab["</s>"]]) + [vocab[t] for t in [*opens, "a", "dog"]] + [
        vocab["</s>"]]


def test_a_split_too_short_for_one_block_names_val_fraction_when_validation_was_split_off(tmp_path):
    """The train split of a file read with --val_fraction 0.9 is short because validation took most of it: the error
    says so (it advised only more text or a smaller --max_length); a validation split too short is told to take a
    larger share. Lists not split from the training text (a hub dataset's own validation) get no such advice."""
    from lora_fast.data import lm_blocks, load_texts

    tokenizer, _ = _word_tokenizer(None)
    f = tmp_path / "d.txt"
    f.write_text("\n\n".join(" ".join(f"p{k}w{i}" for i in range(30)) for k in range(10)) + "\n")
    train, val, _ = load_texts(str(f), val_fraction=0.9, seed=0)
    too_long = 10 * 31 + 1  # more than the whole file's tokens (30 words and one EOS a paragraph)
    with pytest.raises(ConfigError, match=r"the train split has \d+ tokens, fewer than max_length=311; .*a smaller "
                       r"--val_fraction \(validation took 0.9 of the text\)"):
        lm_blocks(tokenizer, train, too_long, "train")
    with pytest.raises(ConfigError, match=r"the validation split .*a larger --val_fraction"):
        lm_blocks(tokenizer, val, too_long, "validation")
    with pytest.raises(ConfigError, match="fewer than max_length") as e:
        lm_blocks(tokenizer, list(val), too_long, "validation")
    assert "--val_fraction" not in str(e.value)


def test_lm_blocks_of_a_bert_tokenizer_separate_by_its_own_sep():
    """No EOS: SEP separates; ``[CLS] … [SEP]`` already ends with it, so one SEP, not two."""
    from lora_fast.data import lm_blocks

    tokenizer, vocab = _word_tokenizer("[CLS] $A [SEP]")
    tokenizer.eos_token = None
    tokenizer.sep_token = "[SEP]"
    got = lm_blocks(tokenizer, DOCS[:1], 4, "train").flatten().tolist()
    assert got == [vocab[t] for t in ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]]



def test_a_dataset_that_is_a_pipe_is_named_as_such(tmp_path):
    """``--dataset /dev/stdin`` or a shell's ``<(cat f)``: it exists but is no regular file, and was reported as
    'does not exist'; both readers (language modelling, classification) name what it is."""
    import os

    from lora_fast.data import load_texts

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file .a pipe or a device"):
        load_texts(str(fifo))
    with pytest.raises(ConfigError, match="is not a regular file .a pipe or a device"):
        load_classification(str(fifo))


def test_a_directorys_validation_text_also_in_train_is_warned_about(tmp_path):
    """A directory's splits are kept as given (they are the user's), but a validation/test row whose text is a
    training text made its accuracy a memory test without a word; each split's shared rows are counted and the first
    named by line. Texts compare stripped; distinct splits warn nothing."""
    import warnings

    train = [("ham", "see you at noon"), ("spam", "win a prize now"), ("ham", "call me later")]
    root = _dir(tmp_path / "d", train, [("ham", "a new text"), ("spam", " win a prize now "), ("ham", "another")])
    _write_csv(root / "test.csv", [("ham", "call me later"), ("ham", "see you at noon"), ("spam", "unseen")])
    with pytest.warns(UserWarning) as seen:
        splits, _ = load_classification(str(root))
    test, val = sorted((str(w.message) for w in seen), key=lambda m: "validation split" in m)
    assert "2 of the 3 rows of" in test and "test.csv (test split)" in test and "first at line 2" in test
    assert "1 of the 3 rows of" in val and "validation.csv (validation split)" in val
    assert "first at line 3" in val and "memory" in val
    assert len(seen) == 2
    assert len(splits["validation"][0]) == 3 and len(splits["test"][0]) == 3  # kept as given
    distinct = _dir(tmp_path / "e", train, [("ham", "a new text"), ("spam", "free cash")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_classification(str(distinct))
