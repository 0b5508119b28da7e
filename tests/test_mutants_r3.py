"""Tests written against mutants that survived the rest of the suite (round 3 of mutation testing: ``data``,
``train_ckpt``, ``train_io``, ``train_args``). Each pins a documented property of the data readers, the checkpoint
checks, the output directory rules or the option table, and names the mutation it kills. No training runs: every
test calls the module's functions directly on small files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_fast.train_args import ConfigError, parse_train_args


# ----------------------------------------------------------------------------------------------------------- data
def test_default_corpus_has_each_text_once():
    """``default_corpus``: the pydoc topics "duplicates removed" (``if`` and ``else`` share a text: kept twice, one
    copy could land in each split), in a fixed order.
    Kills ``default_corpus``: the ``dict.fromkeys`` de-duplication dropped."""
    from lora_fast.data import default_corpus

    docs = default_corpus()
    assert docs and len(set(docs)) == len(docs)
    assert all(d == d.strip() and d for d in docs)
    assert default_corpus() == docs


def test_validation_keeps_the_input_order():
    """``_split_docs``: "both sides keep the input order" — the validation documents are those picked, in the
    input's order (the seeded pick order would shuffle which blocks a capped ``--eval_batches`` reads), then a cut
    document's tail.
    Kills ``_split_docs``: ``sorted(val_idx)`` → ``val_idx`` (D37, pinned now that the order is documented)."""
    from lora_fast.data import _split_docs

    docs = [f"document {i:02d} " + "x" * (10 + 7 * (i % 5)) for i in range(40)]
    for seed in range(5):
        train, val = _split_docs(docs, 0.3, seed=seed)
        whole = [d for d in val if d in docs]
        assert len(whole) > 3 and whole == [d for d in docs if d in set(whole)], seed
        assert train == [d for d in docs if d not in set(whole)] or len(val) > len(whole)


def test_a_windows_path_that_does_not_exist_is_not_asked_of_the_hub(monkeypatch, tmp_path):
    """A ``--dataset`` with a backslash (a Windows path, ``data\\corpus``) is a local path: missing, it is "does not
    exist", not a hub lookup (which would say the hub has no such dataset, or wait for it).
    Kills ``_looks_like_path``: the ``"\\\\" in name`` test dropped."""
    from lora_fast import data

    def no_hub(*a, **k):
        raise AssertionError("asked the hub")

    monkeypatch.setattr(data, "_load_hub_texts", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        data.load_texts("data\\corpus")


def test_a_binary_file_that_decodes_as_utf8_is_refused(tmp_path):
    """A file of another extension is read as plain text only when it is UTF-8 *text*; NUL bytes are valid UTF-8
    but no text file holds them: a binary file (``data.bin``) is refused, named as binary.
    Kills ``read_utf8``: the NUL-byte check dropped."""
    from lora_fast.data import load_texts

    f = tmp_path / "data.bin"
    f.write_bytes(b"PK\x03\x04\x00\x00abc\x00\x01\x02 some words\n\nmore words\n")
    with pytest.raises(ConfigError, match="is binary, not text"):
        load_texts(str(f))


def test_tsv_quoted_fields_with_tabbed_or_indented_lines_are_read(tmp_path):
    """A quoted TSV field's line breaks are its text: a field whose lines hold a tab (one line shaped like a row is
    not yet an unclosed quote) or whose continuation lines are indented (a row line starts with its first cell, not
    with whitespace) is read as one field, not refused as a swallowed-rows quote.
    Kills ``read_csv``: ``swallowed >= 2`` -> ``>= 1``; the field's first line counted (``split("\\n")[1:]`` ->
    ``split("\\n")``); the ``not ln[0].isspace()`` test dropped."""
    from lora_fast.data import read_text_file

    f = tmp_path / "d.tsv"
    one_row_like = "first\tline\nsecond\tline"  # two lines with a tab each: the second is the only row-shaped one
    indented = "def f(x):\n    return\tx\n    pass\tnothing"  # continuation lines start with whitespace
    f.write_text(f'Label\tText\nham\t"{one_row_like}"\nspam\t"{indented}"\nham\tplain\n', encoding="utf-8")
    assert read_text_file(f) == [one_row_like, indented, "plain"]


def test_tsv_unclosed_quote_swallowing_two_rows_is_named(tmp_path):
    """An opening quote that is never closed takes in the rows below it; two swallowed rows are already refused
    (the error names the line), not read as one long text.
    Kills ``read_csv``: ``swallowed >= 2`` -> ``>= 3``."""
    from lora_fast.data import read_text_file

    f = tmp_path / "d.tsv"
    f.write_text('Label\tText\nham\t"an opening quote\nspam\tsecond row\nham\tthird row\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2 has a field opening a quote .* 2 lines that look like rows"):
        read_text_file(f)


def test_a_json_array_file_may_open_with_whitespace(tmp_path):
    """A ``.json`` file may hold one array of objects; a leading line break or indentation (a pretty-printer's)
    does not turn it into JSON lines.
    Kills ``_json_docs``: ``text.lstrip().startswith("[")`` -> ``text.startswith("[")``."""
    from lora_fast.data import read_text_file

    f = tmp_path / "d.json"
    f.write_text('\n  [\n  {"text": "first document"},\n  {"text": "second document"}\n]\n', encoding="utf-8")
    assert read_text_file(f) == ["first document", "second document"]


def test_json_lines_skip_whitespace_only_lines(tmp_path):
    """Blank lines of a JSON lines file are skipped, spaces-only ones too (an editor's indentation, a trailing
    ``"   "``): they hold no object.
    Kills ``_json_docs``: ``if not line.strip()`` -> ``if not line``."""
    from lora_fast.data import read_text_file

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "one"}\n   \n{"text": "two"}\n\t\n', encoding="utf-8")
    assert read_text_file(f) == ["one", "two"]


def test_a_json_line_that_is_not_an_object_is_named(tmp_path):
    """JSON lines are objects with a ``text`` field: a line holding a string (even one containing the word "text")
    or a list is a ``ConfigError`` naming the line, not a ``TypeError`` traceback.
    Kills ``_json_docs``: the ``isinstance(obj, dict)`` check dropped."""
    from lora_fast.data import read_text_file

    for bad in ('"some text here"', '["text"]'):
        f = tmp_path / "d.jsonl"
        f.write_text('{"text": "fine"}\n' + bad + "\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"line 2 is not a JSON object"):
            read_text_file(f)


def test_documents_are_the_paragraph_text_without_surrounding_whitespace(tmp_path):
    """A document is its text: a paragraph's indentation, a file's trailing line break and the spaces around a JSON
    field are not part of it (they would be trained as tokens, and copies differing only by them be two texts).
    Kills ``read_text_file``: ``d.strip()`` of each document dropped."""
    from lora_fast.data import read_text_file

    f = tmp_path / "d.txt"
    f.write_text("  first paragraph\nstill first\n\n\tsecond paragraph  \n", encoding="utf-8")
    assert read_text_file(f) == ["first paragraph\nstill first", "second paragraph"]
    g = tmp_path / "d.jsonl"
    g.write_text('{"text": "  padded \\n"}\n', encoding="utf-8")
    assert read_text_file(g) == ["padded"]


def test_a_line_of_spaces_separates_paragraphs(tmp_path):
    """Plain-text documents are blank-line separated paragraphs, and a line holding only spaces or a tab is blank
    (an editor's indentation left on an empty line).
    Kills ``_paragraphs``: ``\\n\\s*\\n`` -> ``\\n\\n``."""
    from lora_fast.data import read_text_file

    f = tmp_path / "d.txt"
    f.write_text("first paragraph\n   \nsecond paragraph\n\t\nthird\n", encoding="utf-8")
    assert read_text_file(f) == ["first paragraph", "second paragraph", "third"]


def test_the_validation_cut_takes_a_whitespace_up_to_200_characters_away():
    """``_cut``: at the nearest whitespace within max(200 characters, 2 % of the text) of the share's point, else at
    the point itself (a longer window splits off far more or less than the share). A 1000-character text whose only
    space is 50 characters before its 90 % point is cut at that space (no word split); one whose only space is 250
    characters away is cut at the point; of two candidates the nearer one wins.
    Kills ``_cut``: the window's 200 -> 20; its 2 % (``n // 50``) -> 20 % (``n // 5``); the nearest whitespace
    before the point (``before[-1]``) -> the farthest (``before[0]``); the nearer of the two
    candidates -> the one after; the tail's ``strip()`` dropped."""
    from lora_fast.data import _cut

    text = "a" * 850 + " " + "b" * 149
    head, tail = _cut(text, 0.1)
    assert (head, tail) == ("a" * 850, "b" * 149)
    far = "a" * 650 + " " + "b" * 349
    head, tail = _cut(far, 0.1)
    assert head + tail == far and len(tail) == 100
    two = "a" * 850 + " " + "c" * 29 + " " + "b" * 119  # spaces 50 and 20 before the point: the nearer one
    assert _cut(two, 0.1) == ("a" * 850 + " " + "c" * 29, "b" * 119)
    both = "a" * 880 + " " + "c" * 99 + " " + "b" * 19  # 20 before, 80 after: the nearer one, before
    assert _cut(both, 0.1) == ("a" * 880, "c" * 99 + " " + "b" * 19)
    big = "a" * 17000 + " " + "b" * 2999  # 20 000 characters: the window is 2 % = 400, the space 1 000 away
    head, tail = _cut(big, 0.1)
    assert head + tail == big and len(tail) == 2000


def test_a_document_overshooting_the_share_by_less_than_a_fifth_goes_to_validation_whole():
    """Whole documents go to validation; "a document that would overshoot the share by a fifth is passed over", so
    one overshooting it by a tenth is taken whole (not replaced by a cut of another document).
    Kills ``_pick_validation``: ``<= 1.2 * target`` -> ``<= 1.0 * target``."""
    from lora_fast.data import _split_docs

    small, large = "s" * 109 + ".", " ".join(["word"] * 178)  # 110 and 891 characters: the share is 100.1
    for seed in range(4):
        train, val = _split_docs([small, large], 0.1, seed=seed)
        assert (list(train), list(val)) == ([large], [small]), seed


def test_when_whole_documents_fall_short_the_largest_ones_tail_makes_up_the_share():
    """Validation holds ``val_fraction`` of the text: when the whole documents that fit hold under half the share,
    "the largest training document's tail makes up the rest" — the rest, not the whole share again — and the other
    documents stay whole in training.
    Kills ``_pick_validation``: the "near enough" bound ``0.5 * target`` -> ``0.2 * target``; the largest document
    -> the smallest (``max`` -> ``min``); the tail's share ``(target - chars)`` -> ``target``."""
    from lora_fast.data import _split_docs

    small = "tiny doc " * 4 + "ok.."  # 40 characters: the only document that fits the share of 100
    mid, large = " ".join(["mid"] * 100)[:399] + ".", " ".join(["large"] * 94)[:559] + "."
    docs = [mid, small, large]  # 400 + 40 + 560 characters
    for seed in range(3):
        train, val = _split_docs(docs, 0.1, seed=seed)
        assert val[0] == small and mid in train and large not in train, seed
        assert 0.09 <= sum(map(len, val)) / 1000 <= 0.11, seed


def test_negative_integer_labels_sort_as_numbers(tmp_path):
    """Integer labels, negative ones included (a -1/0/1 sentiment column), get ids in numeric order: -2 < -1 < 0 <
    1 < 10, not the string order that puts "-1" before "-2".
    Kills ``_sort_labels``: ``-?\\d+`` -> ``\\d+``."""
    import csv

    from lora_fast.data import load_classification

    d = tmp_path / "d"
    d.mkdir()
    for name, labels in (("train.csv", ["1", "-1", "0", "-2", "10", "-1"]), ("validation.csv", ["0", "-2"])):
        with open(d / name, "w", newline="") as f:
            csv.writer(f).writerows([("Label", "Text"), *((lab, f"{name} row {i}") for i, lab in enumerate(labels))])
    splits, names = load_classification(str(d))
    assert names == ["-2", "-1", "0", "1", "10"]
    assert [names[i] for i in splits["train"][1]] == ["1", "-1", "0", "-2", "10", "-1"]


def test_a_classification_row_whose_text_or_label_is_only_spaces_is_refused(tmp_path):
    """"Every row needs a non-empty text and label": a text or label of spaces is empty (the label would be ``''``
    once stripped, a class of its own); the error names the file and line.
    Kills ``_check_rows``: ``not r[col].strip()`` -> ``not r[col]``."""
    import csv

    from lora_fast.data import load_classification

    for bad in (("ham", "   "), ("  ", "a text")):
        f = tmp_path / "one.csv"
        with open(f, "w", newline="") as fh:
            csv.writer(fh).writerows([("Label", "Text"), *((("ham", "spam")[i % 2], f"row {i}") for i in range(9)),
                                      bad])
        with pytest.raises(ConfigError, match=r"line 11: empty"):
            load_classification(str(f))


def test_default_corpus_has_no_blank_document(monkeypatch):
    """``default_corpus``: its documents are the topics' texts, stripped; a topic whose text is blank is no document
    (an empty text would be an empty training or validation document).
    Kills ``default_corpus``: the ``if topics[k].strip()`` filter dropped."""
    import pydoc_data.topics

    from lora_fast.data import default_corpus

    monkeypatch.setattr(pydoc_data.topics, "topics", {"b": "  \n", "a": " first text\n", "c": "second text", "d": ""})
    assert default_corpus() == ["first text", "second text"]


def test_validation_stops_taking_documents_once_it_holds_the_share():
    """Whole documents go to validation "until they hold ``val_fraction`` of the text": a document that brings it
    exactly to the share ends the picking (100 of 200 characters at 0.5), another one is not added after it. Of the
    seeded orders, those that draw that document first leave it alone in validation.
    Kills ``_pick_validation``: ``chars >= target`` -> ``chars > target``."""
    from lora_fast.data import _split_docs

    exact, small, rest = "a" * 99 + ".", "b" * 19 + ".", "c" * 79 + "."  # 100 + 20 + 80 characters
    vals = {tuple(_split_docs([exact, small, rest], 0.5, seed=seed)[1]) for seed in range(10)}
    assert (exact,) in vals
    assert all(sum(map(len, v)) >= 100 for v in vals)


def test_a_training_text_shared_with_validation_is_warned_of_whatever_its_spaces(tmp_path):
    """A directory's validation text that is also a training text, "stripped, compared exactly", is named in a
    warning: a training copy with surrounding spaces is the same text.
    Kills ``_warn_shared_texts``: the training texts' ``strip()`` dropped."""
    import csv

    from lora_fast.data import load_classification

    d = tmp_path / "d"
    d.mkdir()
    for name, rows in (("train.csv", [("ham", "  a shared text "), ("spam", "other text")]),
                       ("validation.csv", [("ham", "a shared text"), ("spam", "new text")])):
        with open(d / name, "w", newline="") as f:
            csv.writer(f).writerows([("Label", "Text"), *rows])
    with pytest.warns(UserWarning, match=r"1 of the 2 rows of .*validation\.csv .*\(first at line 2\)"):
        load_classification(str(d))


# ----------------------------------------------------------------------------------------------------- train_ckpt
def _checkpoint(tmp_path, opts, name="checkpoint-3", **fields):
    """A format-2 ``training_state.pt`` of a run with ``opts`` (what ``load_checkpoint`` reads), ``fields`` changed."""
    from lora_fast.train_ckpt import FORMAT, STATE_NAME, _options

    state = {"format": FORMAT, "step": 3, "passes": 1, "micro_done": 3, "tokens_seen": 96, "planned_steps": 8,
             "world_size": 1, "digest": "data", "options": _options(opts), "rng": {}, "trainable": {},
             "optimizer": {}, "scheduler": {}, "scaler": {}, "metrics": {}, "base_digest": "base", **fields}
    path = tmp_path / name
    path.mkdir(parents=True)
    torch.save(state, path / STATE_NAME)
    return path


ONE = SimpleNamespace(world_size=1, enabled=False, is_main=True)


def test_output_logging_evaluation_cadence_device_and_backend_may_change_on_resume(tmp_path):
    """"Output, logging, evaluation cadence, device and backend may change" (and activation checkpointing, which
    recomputes the same numbers): a resumed run with other such options is accepted; the options that shape the run
    (``lr`` here) are not.
    Kills ``MAY_CHANGE``: ``eval_steps`` removed; ``gradient_checkpointing`` removed."""
    from lora_fast.train_ckpt import load_checkpoint

    base = ["--lr", "0.01", "--save_steps", "2"]
    path = _checkpoint(tmp_path, parse_train_args(base))
    changed = [["--eval_steps", "7"], ["--eval_batches", "2"], ["--output_dir", str(tmp_path / "elsewhere")],
               ["--logdir", str(tmp_path / "logs")], ["--device", "cpu"], ["--backend", "reference"],
               ["--num_workers", "1"], ["--no-progress"], ["--save_steps", "5", "--save_total_limit", "2"],
               ["--gradient_checkpointing"]]
    for flags in ([*base, *sum(changed, [])], *([*base, *c] for c in changed)):
        state = load_checkpoint(path, parse_train_args(flags), "data", ONE, 8, base="base")
        assert state["step"] == 3, flags
    with pytest.raises(ConfigError, match=r"options differ .*lr \(checkpoint 0.01, now 0.02\)"):
        load_checkpoint(path, parse_train_args(["--lr", "0.02", "--save_steps", "2"]), "data", ONE, 8, base="base")


def _fake_fcntl(on_flock):
    import fcntl

    return SimpleNamespace(LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB,
                           flock=lambda fd, op: (on_flock(), fcntl.flock(fd, op)))


def test_a_lock_file_removed_between_open_and_flock_is_taken_again(tmp_path):
    """``root_held``: "a lock taken on a file another run removed meanwhile is taken again on the new one (an inode
    check)": the run that held the root removes its lock file between our open and our flock; the lock we then hold
    must be on the file that is in place (holding our pid), not on the removed one, which locks nothing.
    Kills ``_lock_file``: the inode comparison replaced by ``same = True``."""
    import os

    from lora_fast.train_ckpt import _lock_file

    lock = tmp_path / ".lora-fast.lock"
    calls = []

    def removed_by_the_other_run():
        calls.append(1)
        if len(calls) == 1:
            lock.unlink()

    fd = _lock_file(_fake_fcntl(removed_by_the_other_run), lock, tmp_path)
    try:
        assert lock.exists() and os.fstat(fd).st_ino == os.stat(lock).st_ino
        assert lock.read_text() == str(os.getpid()) and len(calls) == 2
    finally:
        os.close(fd)


def test_the_lock_file_names_the_holders_pid_only(tmp_path):
    """The lock file holds the pid of the run holding it (a second run's error names it): a longer pid left by an
    earlier run is replaced whole, not overwritten in part.
    Kills ``_lock_file``: ``os.ftruncate(fd, 0)`` dropped."""
    import fcntl
    import os

    from lora_fast.train_ckpt import _lock_file

    lock = tmp_path / ".lora-fast.lock"
    lock.write_text("123456789012345")
    fd = _lock_file(fcntl, lock, tmp_path)
    try:
        assert lock.read_text() == str(os.getpid())
    finally:
        os.close(fd)


def test_a_run_without_save_steps_neither_holds_nor_checks_the_checkpoint_root(tmp_path):
    """The checkpoint root is held, and checked for another run's checkpoints, only for a run that writes
    checkpoints (``--save_steps``): a run without it beside a checkpointing run, or beside another run's checkpoints,
    is not refused (it writes none there).
    Kills ``root_held``: ``opts.save_steps is None`` dropped from the early exit; ``check_options``: the
    ``save_steps is None`` early return dropped."""
    from lora_fast.train_ckpt import STATE_NAME, check_options, root_held

    out = str(tmp_path / "out")
    with root_held(parse_train_args(["--output_dir", out, "--save_steps", "2"])):
        with root_held(parse_train_args(["--output_dir", out])):
            pass
    (tmp_path / "out-checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "out-checkpoints" / "checkpoint-2" / STATE_NAME).write_bytes(b"state")
    assert check_options(parse_train_args(["--output_dir", out])) == (tmp_path / "out-checkpoints", None)


def test_a_checkpoint_root_that_existed_empty_is_left_as_found(tmp_path):
    """``root_held`` removes the root on the way out only "when the run created it and wrote nothing there": an
    empty directory the user made beforehand is left in place.
    Kills ``root_held``: the ``created`` condition of the ``rmdir`` dropped."""
    from lora_fast.train_ckpt import root_held

    root = tmp_path / "ckpts"
    root.mkdir()
    with root_held(parse_train_args(["--checkpoint_dir", str(root), "--save_steps", "2"])):
        assert (root / ".lora-fast.lock").exists()
    assert root.is_dir() and not any(root.iterdir())


def test_a_relative_checkpoint_dir_holds_the_checkpoint_resumed_by_its_absolute_path(tmp_path, monkeypatch):
    """Whether the resumed checkpoint is one of the root's compares the paths with links resolved: ``--checkpoint_dir
    ck`` (relative) and ``--resume_from_checkpoint /abs/ck/checkpoint-2`` name the same directory, so the run is
    accepted (it was "the resumed checkpoint is not among them").
    Kills ``_in_root``: ``resolve()`` dropped."""
    from lora_fast.train_ckpt import STATE_NAME, check_options

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "ck" / "checkpoint-2" / STATE_NAME).write_bytes(b"state")
    opts = parse_train_args(["--checkpoint_dir", "ck", "--save_steps", "2",
                             "--resume_from_checkpoint", str(tmp_path / "ck" / "checkpoint-2")])
    root, resume = check_options(opts)
    assert resume == tmp_path / "ck" / "checkpoint-2"


def test_checkpoints_set_aside_twice_before_keep_their_names(tmp_path):
    """Setting aside a later checkpoint never replaces an earlier abandoned one: with ``checkpoint-4.abandoned`` and
    ``checkpoint-4.abandoned-2`` already there, the new one becomes ``checkpoint-4.abandoned-3`` (all kept).
    Kills ``set_aside_newer``: ``while dest.exists()`` -> ``if dest.exists()``."""
    from lora_fast.train_ckpt import STATE_NAME, set_aside_newer

    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-4.abandoned", "checkpoint-4.abandoned-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_NAME).write_text(name)
    moved = set_aside_newer(tmp_path, tmp_path / "checkpoint-2", log=lambda msg: None)
    assert [p.name for p in moved] == ["checkpoint-4.abandoned-3"]
    for name, was in (("checkpoint-4.abandoned", "checkpoint-4.abandoned"),
                      ("checkpoint-4.abandoned-2", "checkpoint-4.abandoned-2"),
                      ("checkpoint-4.abandoned-3", "checkpoint-4")):
        assert (tmp_path / name / STATE_NAME).read_text() == was


def test_resuming_a_checkpoint_of_another_directory_sets_nothing_aside(tmp_path):
    """``set_aside_newer`` renames the later checkpoints of the root the resumed checkpoint is in; a checkpoint
    elsewhere (another run's ``checkpoint-2``) is no step of this root's run, whose checkpoints stay as they are.
    Kills ``set_aside_newer``: the ``_in_root`` condition dropped."""
    from lora_fast.train_ckpt import STATE_NAME, set_aside_newer

    for d in ("root/checkpoint-4", "other/checkpoint-2"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / STATE_NAME).write_bytes(b"state")
    assert set_aside_newer(tmp_path / "root", tmp_path / "other" / "checkpoint-2", log=print) == []
    assert (tmp_path / "root" / "checkpoint-4").is_dir()


def test_the_base_digest_fingerprints_the_frozen_weights_only():
    """``base_digest``: "a fingerprint of the frozen weights" — sha256 over each frozen tensor's name, shape, dtype
    and up to 1024 of its values at evenly spaced positions. Training the trainable parameters leaves it as it is
    (a resumed run compares it with the checkpoint's); other frozen values anywhere among the sampled ones change
    it, and so do the same values in another shape or dtype.
    Kills ``base_digest``: the ``requires_grad`` skip dropped; the sample 1024 -> 2 values; the name, shape and
    dtype left out of the hash."""
    from lora_fast.train_ckpt import base_digest

    def model(shape=(32, 32), dtype=torch.float32):
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.base = torch.nn.Parameter(torch.arange(1024, dtype=torch.float32).reshape(shape).to(dtype),
                                    requires_grad=False)
        m.lora = torch.nn.Parameter(torch.randn(4, 4))
        return m

    m = model()
    digest = base_digest(m)
    with torch.no_grad():
        m.lora.add_(1.0)
    assert base_digest(m) == digest
    with torch.no_grad():
        m.base[16, 3] += 1.0  # a value in the middle of the tensor (sampled: 1024 values, all of them)
    assert base_digest(m) != digest
    assert base_digest(model((64, 16))) != digest
    assert base_digest(model(dtype=torch.float64)) != digest


def test_a_checkpoint_path_may_start_with_a_tilde(tmp_path, monkeypatch):
    """``--resume_from_checkpoint=~/ck/checkpoint-2`` (the shell expands no ``~`` after ``=``) is the checkpoint in
    the home directory, not "is not a checkpoint".
    Kills ``find_checkpoint``: ``expanduser()`` dropped."""
    from lora_fast.train_ckpt import STATE_NAME, find_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home" / "ck" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "home" / "ck" / "checkpoint-2" / STATE_NAME).write_bytes(b"state")
    assert find_checkpoint("~/ck/checkpoint-2", tmp_path / "other") == tmp_path / "home" / "ck" / "checkpoint-2"


def test_another_model_path_is_accepted_only_when_the_base_digests_match(tmp_path):
    """``--model`` "may name another path when the content is the same": the same content is a recorded
    ``base_digest`` equal to this run's. A checkpoint that predates ``base_digest`` (none recorded), or a check
    without this run's digest, cannot show that: another ``--model`` there is an option that differs.
    Kills ``load_checkpoint``: the ``model`` relocation taken as always the same content (``"model": True``); the
    ``base is not None`` condition of ``same_base`` dropped (no digest on either side counted as equal)."""
    from lora_fast.train_ckpt import load_checkpoint

    path = _checkpoint(tmp_path, parse_train_args(["--model", "gpt2", "--save_steps", "2"]), base_digest=None)
    moved = parse_train_args(["--model", "distilgpt2", "--save_steps", "2"])
    for base in ("base", None):
        with pytest.raises(ConfigError, match=r"options differ .*model \(checkpoint 'gpt2', now 'distilgpt2'\)"):
            load_checkpoint(path, moved, "data", ONE, 8, base=base)


def test_a_checkpoint_without_a_base_digest_resumes_with_the_same_model(tmp_path):
    """``base_digest`` is newer than format 2 ("absent in older files"): such a checkpoint resumes with the same
    ``--model`` (nothing to compare), it is not taken for one of another base.
    Kills ``load_checkpoint``: ``base_digest not in (None, base)`` -> ``!= base``."""
    from lora_fast.train_ckpt import load_checkpoint

    opts = parse_train_args(["--model", "gpt2", "--save_steps", "2"])
    path = _checkpoint(tmp_path, opts, base_digest=None)
    assert load_checkpoint(path, opts, "data", ONE, 8, base="base")["step"] == 3


def test_a_checkpoint_of_a_run_planned_for_other_steps_is_refused(tmp_path):
    """Resuming continues the checkpointed run: one planned for another number of optimizer steps (its LR schedule
    ends elsewhere) is refused, naming both numbers.
    Kills ``load_checkpoint``: the ``planned_steps`` check dropped."""
    from lora_fast.train_ckpt import load_checkpoint

    opts = parse_train_args(["--save_steps", "2"])
    path = _checkpoint(tmp_path, opts)
    with pytest.raises(ConfigError, match="the run was planned for 8 steps, this one for 9"):
        load_checkpoint(path, opts, "data", ONE, 9, base="base")


def _save(root, ctx, step=2, shift=0.0):
    """``save_checkpoint`` of a one-layer LoRA model at ``step`` (its LoRA weights shifted by ``shift``)."""
    from lora_fast import apply_lora
    from lora_fast.train_ckpt import Position, capture_rng, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 4)
    apply_lora(model, ["proj"], rank=2)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(shift)
    optimizer = torch.optim.AdamW(params)
    pos = Position(step=step, passes=1, micro_done=step, tokens_seen=32 * step, rng=capture_rng(torch.device("cpu")))
    return save_checkpoint(root, pos, model=model, optimizer=optimizer,
                           scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                           scaler=torch.amp.GradScaler("cpu", enabled=False), metrics={"train_loss": [1.0]},
                           opts=parse_train_args(["--save_steps", "2"]), prep=SimpleNamespace(base_name="tiny"),
                           total=8, digest="data", ctx=ctx, limit=None, base="base")


def test_a_checkpoint_of_a_step_already_saved_is_replaced(tmp_path):
    """``save_checkpoint``: "one already there is replaced" — a resumed run interrupted before its first step saves
    the step it resumed from again; that is this run's state, written in place of the old one (not refused as an
    output directory that became non-empty, with the state kept aside).
    Kills ``save_checkpoint``: ``StagedDir(final, overwrite=True)`` -> ``overwrite=False``."""
    from lora_fast.train_ckpt import STATE_NAME, list_checkpoints

    first = _save(tmp_path, ONE)
    again = _save(tmp_path, ONE, shift=1.0)
    assert again == first == tmp_path / "checkpoint-2"
    assert list_checkpoints(tmp_path) == [(2, first)] and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    state = torch.load(first / STATE_NAME, weights_only=True)
    assert all(torch.equal(t, torch.full_like(t, 1.0)) for n, t in state["trainable"].items() if "lora_B" in n)


def test_only_the_main_rank_writes_a_checkpoint(tmp_path):
    """Under torchrun every rank calls ``save_checkpoint``; "rank 0 writes and returns the path, the others return
    None" — a second rank writing the same ``checkpoint-<step>`` would race the first.
    Kills ``save_checkpoint``: the ``not ctx.is_main`` return dropped."""
    root = tmp_path / "ck"
    assert _save(root, SimpleNamespace(world_size=1, enabled=False, is_main=False)) is None
    assert not root.exists() or not any(root.iterdir())


def test_holding_a_checkpoint_root_that_is_a_file_is_a_one_line_error(tmp_path):
    """``root_held`` checks the root as ``check_options`` does (``run`` takes it before the model loads): a
    ``--checkpoint_dir`` that is a file is a ``ConfigError`` naming it, not a ``FileExistsError`` traceback.
    Kills ``root_held``: its ``check_creatable_dir`` dropped."""
    from lora_fast.train_ckpt import root_held

    f = tmp_path / "ck"
    f.write_text("a file")
    with pytest.raises(ConfigError, match=r"--checkpoint_dir .*ck' exists and is not a directory"):
        with root_held(parse_train_args(["--checkpoint_dir", str(f), "--save_steps", "2"])):
            pass
    assert f.read_text() == "a file"


def test_a_newer_checkpoint_format_names_the_version_that_wrote_it(tmp_path):
    """A checkpoint of a newer format is refused, "resume with that version": the error names the lora-fast version
    the checkpoint records (its ``versions``), when it records one.
    Kills ``_written_by``: the version left out."""
    from lora_fast.train_ckpt import load_checkpoint

    opts = parse_train_args(["--save_steps", "2"])
    path = _checkpoint(tmp_path, opts, format=99, versions={"lora_fast": "9.8.7", "torch": "3.0"})
    with pytest.raises(ConfigError, match=r"checkpoint format 99; this one reads format 2, written by lora-fast "
                                          r"9\.8\.7\); resume with that version"):
        load_checkpoint(path, opts, "data", ONE, 8, base="base")


# ----------------------------------------------------------------------------------------------------- train_args
@pytest.mark.parametrize("flags, phrase", [
    (["--lr", "inf"], "lr must be a positive number"),  # math.isfinite: inf > 0 would pass
    (["--alpha", "nan"], "alpha must be a positive number"),
    (["--val_fraction", "0"], "val_fraction must be in (0, 1)"),
    (["--rank", "4.5"], "rank must be an integer, got '4.5'"),  # no silent truncation to 4
])
def test_option_values_outside_their_range_are_one_line_errors(flags, phrase):
    """Every option value goes through its check with a one-line ``ConfigError`` naming the option: infinite and
    NaN learning rates or alphas are not positive numbers, a validation share of 0 is outside (0, 1), a fractional
    or overflowing count is not an integer (no truncation, no ``OverflowError`` traceback).
    Kills ``_pos_float``: ``math.isfinite`` dropped; ``val_fraction``'s ``0.0 < v`` -> ``0.0 <= v``;
    ``_convert``: the ``is_integer`` check dropped; ``OverflowError`` not caught (a YAML integer too large for a
    float, ``alpha: 1000…0``)."""
    with pytest.raises(ConfigError) as e:
        parse_train_args(flags)
    assert phrase in str(e.value)


def test_a_yaml_number_too_large_for_a_float_is_a_one_line_error(tmp_path):
    """``alpha: 1e400`` written out as an integer: YAML reads a Python int, whose ``float()`` overflows; that is
    "alpha must be a number", not an ``OverflowError`` traceback.
    Kills ``_convert``: ``OverflowError`` dropped from the caught exceptions."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("alpha: 1" + "0" * 400 + "\n")
    with pytest.raises(ConfigError, match="alpha must be a number"):
        parse_train_args(["--config", str(cfg)])


def test_integers_beyond_float_precision_are_exact():
    """Integers are parsed exactly, any size below the option's bound: a seed of 2**53 + 1 stays 2**53 + 1 (through
    a float it became 2**53), from the command line and from YAML's ``1e3``-style floats alike.
    Kills ``_convert``: ``int(text)`` -> ``int(float(text))``."""
    assert parse_train_args(["--seed", "9007199254740993"]).seed == 9007199254740993
    assert parse_train_args(["--max_steps", "1e3"]).max_steps == 1000


def test_checkpoint_dir_with_resume_alone_is_accepted(tmp_path):
    """``checkpoint_dir`` "needs save_steps or resume_from_checkpoint": resuming alone (``latest`` is looked up in
    that directory) is a use of it, not an error.
    Kills ``validate``: the ``resume_from_checkpoint is None`` condition dropped."""
    o = parse_train_args(["--checkpoint_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert o.checkpoint_dir == str(tmp_path) and o.save_steps is None
    with pytest.raises(ConfigError, match="checkpoint_dir needs save_steps or resume_from_checkpoint"):
        parse_train_args(["--checkpoint_dir", str(tmp_path)])


def test_yaml_keys_may_be_spelt_with_dashes(tmp_path):
    """YAML keys are the option names; ``max-steps`` (the command line's spelling) is ``max_steps``.
    Kills ``load_yaml``: the ``-`` -> ``_`` normalisation dropped."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-steps: 4\nbatch-size: 2\n")
    o = parse_train_args(["--config", str(cfg)])
    assert (o.max_steps, o.batch_size) == (4, 2)


def test_an_empty_target_modules_list_is_a_one_line_error(tmp_path):
    """``target_modules`` is "module names (space- or comma-separated), one regex, or 'all-linear'": an empty YAML
    list names none, and is refused when the options are read (it reached ``apply_lora`` after the model had
    loaded), as an empty name is.
    Kills ``_convert``: the ``not vals`` (empty list) check dropped."""
    cfg = tmp_path / "c.yaml"
    for value in ("[]", "['']"):
        cfg.write_text(f"target_modules: {value}\n")
        with pytest.raises(ConfigError, match="target_modules must be module names, a regex or 'all-linear'"):
            parse_train_args(["--config", str(cfg)])
    for value in (",", " ", ", ,"):  # the command line's separators alone: no name either (they gave [] too)
        with pytest.raises(ConfigError, match="target_modules must be module names, a regex or 'all-linear'"):
            parse_train_args(["--target_modules", value])


# ------------------------------------------------------------------------------------------------------- train_io
def test_run_metrics_take_the_last_evaluation_and_both_throughputs():
    """``finish_metrics``: ``final_eval_loss`` is the last evaluation's, "taken at ``final_eval_step``" (the last
    evaluation's step); ``train_tokens_per_sec`` is the timed optimizer steps' tokens over their time, and
    ``mean_tokens_per_sec`` "all tokens over the whole wall time".
    Kills ``finish_metrics``: ``final_eval_step`` the first evaluation's (``[-1]`` -> ``[0]``);
    ``mean_tokens_per_sec`` over the timed tokens instead of all."""
    import time

    from lora_fast.train_io import finish_metrics

    m = {"_timed": (300, 2.0), "eval": [{"step": 2, "eval_loss": 3.0}, {"step": 4, "eval_loss": 2.5}], "epochs": [],
         "train_loss": [4.0, 3.5, 3.0, 2.8]}
    out = finish_metrics(m, SimpleNamespace(backend="reference", task="causal-lm"),
                         SimpleNamespace(base_name="tiny", source="corpus.txt"), 4, 8, 1000, time.perf_counter() - 5.0,
                         torch.device("cpu"), "reference", False)
    assert (out["final_eval_loss"], out["final_eval_step"], out["eval_steps"]) == (2.5, 4, [2, 4])
    assert out["train_tokens_per_sec"] == 150.0
    assert out["mean_tokens_per_sec"] == pytest.approx(1000 / out["wall_time_s"])
