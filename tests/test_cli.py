"""``lora-fast`` options, YAML precedence, data readers, model resolution offline, and bad input.

Bad input must give one clear line on stderr, exit status 2, and leave nothing behind (no output directory, no
staging directory). The offline fallback is tested with the hub unreachable for real: ``HF_ENDPOINT`` points at a
closed local port and the cache is an empty temporary directory.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_fast
from lora_fast.cli import main as cli_main
from lora_fast.data import load_texts
from lora_fast.train_args import ConfigError, parse_train_args
from lora_fast.train_model import load_base_model
from tests.utils import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64)).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ options / YAML
def test_yaml_values_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 4\nalpha: 8\nlr: 1.0e-3\ntarget_modules: [c_attn, c_proj]\nbf16: true\nmax_steps: 7\n")
    o = parse_train_args(["--config", str(cfg)])
    assert (o.rank, o.alpha, o.lr, o.target_modules, o.bf16, o.max_steps) == (4, 8.0, 1e-3, ["c_attn", "c_proj"],
                                                                              True, 7)
    assert o.batch_size == 8 and o.dropout == 0.0  # untouched options keep their defaults
    o = parse_train_args(["--config", str(cfg), "--rank", "16", "--target_modules", "all-linear", "--no-bf16"])
    assert (o.rank, o.alpha, o.target_modules, o.bf16) == (16, 8.0, "all-linear", False)
    o = parse_train_args(["--config", str(cfg), "--fp16"])  # one precision on the command line wins over the file's
    assert (o.fp16, o.bf16) == (True, False)
    with pytest.raises(ConfigError, match="choose one of fp16 and bf16"):
        parse_train_args(["--fp16", "--bf16"])  # both on the command line: which one was meant is unknown
    assert parse_train_args(["--target_modules", r"h\.\d+\.attn\.c_attn"]).target_modules == r"h\.\d+\.attn\.c_attn"


def test_backend_defaults_to_lora_fast_backend_as_the_library_does(monkeypatch):
    monkeypatch.delenv("LORA_FAST_BACKEND", raising=False)
    assert parse_train_args([]).backend == "auto"
    monkeypatch.setenv("LORA_FAST_BACKEND", "Reference")
    assert parse_train_args([]).backend == "reference"
    assert parse_train_args(["--backend", "auto"]).backend == "auto"  # the flag wins
    monkeypatch.setenv("LORA_FAST_BACKEND", "fused")
    with pytest.raises(ConfigError, match="LORA_FAST_BACKEND='fused' is not one of .*--backend's default"):
        parse_train_args([])
    assert parse_train_args(["--backend", "triton"]).backend == "triton"


@pytest.mark.parametrize("yaml_text, phrase", [
    ("rank: 0\n", "rank must be a positive integer"),
    ("rank: eight\n", "rank must be an integer"),
    ("dropout: 1.5\n", "dropout must be in [0, 1)"),
    ("learning_rate: 0.1\n", "unknown option(s) ['learning_rate'] (learning_rate: did you mean lr?); known: ['a"),
    ("rnak: 4\nfoo: 1\n", "unknown option(s) ['foo', 'rnak'] (rnak: did you mean rank?); known:"),
    ("- rank\n", "must be a mapping"),
    ("rank: [\n", "not valid YAML"),
    ("fp16: yes please\n", "fp16 must be true or false"),
    ('use_rslora: "true"\n', "use_rslora must be true or false (unquoted: a quoted YAML value is a string)"),
    ("rank: true\n", "rank must be an integer, got True"),
    ("rank: 4\nalpha: 8\nrank: 16\n", "gives ['rank'] more than once"),  # last-one-wins used to be silent
    ("max-steps: 4\nmax_steps: 5\n", "gives ['max_steps'] more than once"),
    ("config: other.yaml\n", "config files do not include others"),  # was dropped silently
])
def test_yaml_bad_values(tmp_path, yaml_text, phrase):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        parse_train_args(["--config", str(cfg)])
    assert phrase in str(e.value)


@pytest.mark.parametrize("command", ["train", "sweep", "merge"])
def test_an_unknown_flag_suggests_the_option_meant(capsys, command):
    """HF's and PEFT's names (``--learning_rate``, ``--lora_alpha``, ``--num_train_epochs``) and misspellings were
    "unrecognized arguments" and nothing more: the error now names lora-fast's option for each it can tell (the
    command's own: merge has ``--model`` but no ``--lr``); a flag it cannot tell is named alone."""
    argv = {"train": ["--learning_rate", "0.1", "--lora_alpha=3", "--num_train_epochs", "2", "--frobnicate"],
            "sweep": ["--rnaks", "4", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--frobnicate"],
            "merge": ["--adapter", "a", "--output", "o", "--modle", "gpt2", "--learning_rate", "1", "--frobnicate"]}
    with pytest.raises(SystemExit) as e:
        cli_main([command, *argv[command]])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    want = {"train": "(--learning_rate: did you mean --lr?; --lora_alpha: did you mean --alpha?; "
                     "--num_train_epochs: did you mean --epochs?)",
            "sweep": "(--rnaks: did you mean --ranks?; --per_device_train_batch_size: did you mean --batch_size?)",
            "merge": "(--modle: did you mean --model?)"}[command]
    assert err.startswith(f"lora-fast {command}: error: unrecognized arguments: ") and err.endswith(want), err
    assert "--frobnicate" in err and "--frobnicate:" not in err
    assert command != "sweep" or "--save_strategy: " not in err  # not the --save_steps a sweep refuses


def test_peft_s_r_as_a_flag_names_the_rank(capsys):
    """``--r 8`` (LoraConfig's name) is a prefix of several options: argparse's "ambiguous option" error, which now
    also names lora-fast's ``--rank`` as the unrecognized PEFT names do (``ALIASES``); ``--r=8`` alike. A prefix that
    is no alias gets argparse's message alone."""
    for argv, hint in ((["train", "--r", "8"], " (--r: did you mean --rank?)"),
                       (["train", "--r=8"], " (--r: did you mean --rank?)"), (["merge", "--o", "x"], "")):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and "error: ambiguous option: " in err and err.endswith(" could match " + (
            "--rank, --resume_from_checkpoint" if argv[0] == "train" else "--output, --overwrite") + hint), err


# ---------------------------------------------------------------------------------------------------- bad input
def _bad(tmp_path, tiny, extra):
    return ["train", "--model", str(tiny), "--max_steps", "2", "--max_length", "32", "--output_dir",
            str(tmp_path / "out"), "--no-progress", *extra]


@pytest.mark.parametrize("extra, phrase", [
    (["--dataset", "{tmp}/missing.txt"], "does not exist"),
    (["--dataset", "{tmp}/empty.txt"], "is empty"),
    (["--dataset", "{tmp}/bad.jsonl"], "line 2 is not valid JSON"),
    (["--target_modules", "q_proj"], "matched no module"),
    (["--rank", "0"], "rank must be a positive integer"),
    (["--rank", "1000000000000"], "rank=1000000000000: the LoRA weights of the 2 targeted layers would take "
     "1.91e+06 GiB, more than this machine's"),  # was the allocator's traceback
    (["--dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--lr=-1e-4"], "lr must be a positive number"),
    (["--lr", "fast"], "lr must be a number"),
    (["--batch_size", "2.5"], "batch_size must be an integer"),
    (["--fp16", "--bf16"], "not both"),
    (["--max_length", "100"], "exceeds the model's 64 positions"),
    (["--model", "{tmp}/no-such-model"], "does not exist"),
    (["--config", "{tmp}/missing.yaml"], "config file"),
    (["--seed", "99999999999999999999"], "seed must be an integer in [0, 2**63)"),
    (["--device", "mps"], "device must be auto, cpu or cuda[:N], got 'mps'"),
    # review round 3: each of these was a traceback, a wrong answer or a silent fallback before
    (["--task", "classification", "--dataset", "{tmp}/cls", "--max_length", "100"], "exceeds the model's 64 positions"),
    (["--task", "classification", "--dataset", "{tmp}/cls_empty_text"], "train.csv (train split) line 3: empty 'Text'"),
    (["--task", "classification", "--dataset", "{tmp}/cls_no_label"], "validation.csv (validation split) line 2: "
     "missing 'Label'"),
    (["--task", "classification", "--dataset", "{tmp}/cls_unseen"], "label(s) ['maybe'] of the validation split do "
     "not occur in the train split"),
    (["--dataset", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text (line 2, byte 14)"),
    (["--dataset", "{tmp}/data.parquet"], "is binary, not text (.parquet is not a supported format)"),
    (["--dataset", "{tmp}/null.jsonl"], "null.jsonl line 2: field 'text' is null, expected a string"),
    (["--dataset", "{tmp}/number.jsonl"], "number.jsonl line 1: field 'text' is 5, expected a string"),
    (["--dataset", "{tmp}/pretty.json"], "line 1 is not valid JSON (Expecting property name enclosed in double "
     "quotes); expected JSON lines"),
    # review round 4: a text file for classification was read as CSV (a quoting error)
    (["--task", "classification", "--dataset", "{tmp}/latin1.txt"], "reads CSV/TSV files with Label and Text "
     "columns"),
    # the head is trained whole by the CLI itself: the way out is --target_modules (the CLI has no modules_to_save)
    (["--task", "classification", "--dataset", "{tmp}/cls", "--target_modules", "c_attn", "score"],
     "lora-fast train --task classification trains its head (score) whole: leave it out of --target_modules"),
])
def test_bad_input_one_line_and_nothing_written(tmp_path, tiny_gpt2, capsys, extra, phrase):
    (tmp_path / "empty.txt").write_text("  \n\n \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    (tmp_path / "latin1.txt").write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "data.parquet").write_bytes(b"PAR1\x15\x00\x15\x1c" + bytes(range(256)))
    (tmp_path / "null.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "pretty.json").write_text('{\n  "text": "one object over several lines"\n}\n')
    ok = "Label,Text\nspam,win cash now\nham,see you at lunch\nspam,free prize\n"
    _write_csvs(tmp_path / "cls", ok, ok)
    _write_csvs(tmp_path / "cls_empty_text", "Label,Text\nspam,win cash\nham,\n", ok)
    _write_csvs(tmp_path / "cls_no_label", ok, "Text,Label\nwin cash now\n")  # a short row: no Label field
    _write_csvs(tmp_path / "cls_unseen", ok, ok + "maybe,who knows\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in _bad(tmp_path, tiny_gpt2, extra)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines()  # not transformers' load bar, nor a notice ("lora-fast: ...")
            if line.startswith("lora-fast") and not line.startswith("lora-fast: ")]
    assert len(ours) == 1 and ours[0].startswith("lora-fast train: error:") and phrase in ours[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*staging*"))


def _write_csvs(root, train: str, validation: str):
    root.mkdir()
    (root / "train.csv").write_text(train)
    (root / "validation.csv").write_text(validation)


def test_existing_output_dir_refused_then_overwritten(tmp_path, tiny_gpt2, capsys):
    """A non-empty output_dir needs --overwrite, which replaces an earlier run's directory as a whole (one with the
    .lora-fast-output record every run writes); any other directory (a project folder given by mistake, a PEFT or
    Trainer output with adapter_config.json) is refused even with --overwrite, untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli_main(_bad(tmp_path, tiny_gpt2, [])) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli_main(_bad(tmp_path, tiny_gpt2, ["--overwrite"])) == 2
    assert "is not an earlier lora-fast output (it holds keep.txt" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # A PEFT / HF Trainer output holds adapter_config.json (and checkpoints): not ours to delete either.
    for name in ("adapter_config.json", "training_metrics.json", "config.json"):
        (out / name).write_text("{}")
    (out / "checkpoint-500").mkdir()
    assert cli_main(_bad(tmp_path, tiny_gpt2, ["--overwrite"])) == 2
    assert "no .lora-fast-output file" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "checkpoint-500", "config.json", "keep.txt",
                                                     "training_metrics.json"]
    for p in [*out.glob("*.json"), out / "checkpoint-500"]:
        p.rmdir() if p.is_dir() else p.unlink()
    assert cli_main(_bad(tmp_path, tiny_gpt2, [])) == 2  # keep.txt still there: refused without --overwrite
    capsys.readouterr()
    (out / "keep.txt").unlink()
    assert cli_main(_bad(tmp_path, tiny_gpt2, [])) == 0  # an earlier run's directory ...
    assert json.loads((out / ".lora-fast-output").read_text())["written_by"] == "lora-fast train"
    (out / "keep.txt").write_text("a stray file")  # ... plus a stray file: replaced as a whole
    assert cli_main(_bad(tmp_path, tiny_gpt2, ["--overwrite"])) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".*staging*")) and not list(tmp_path.glob(".*old*"))
    finder = tmp_path / "finder"  # a file browser's clutter alone (.DS_Store) is no one's work: replaced
    finder.mkdir()
    (finder / ".DS_Store").write_bytes(b"\0")
    args = _bad(tmp_path, tiny_gpt2, ["--overwrite"])
    args[args.index(str(out))] = str(finder)
    assert cli_main(args) == 0 and (finder / "adapter_model.safetensors").is_file()
    project = tmp_path / "project"  # other hidden entries are: a fresh repository's .git, a .venv, a .env
    for hidden in (".git", ".venv"):
        (project / hidden).mkdir(parents=True)
        (project / hidden / "HEAD").write_text("history")
        args[args.index(str(finder) if str(finder) in args else str(project))] = str(project)
        assert cli_main(args) == 2
        assert f"is not an earlier lora-fast output (it holds {hidden}" in capsys.readouterr().err
        assert (project / hidden / "HEAD").read_text() == "history"
        (project / hidden / "HEAD").unlink()
        (project / hidden).rmdir()


def test_output_dir_that_would_delete_inputs_or_logs_is_refused(tmp_path, tiny_gpt2, capsys, monkeypatch):
    """--overwrite replaces the whole output directory: one holding the run's dataset, config or the current
    directory is refused (nothing deleted); so is a --logdir inside it (the logs would vanish at the end) and an
    output_dir under a file."""
    (tmp_path / "data.txt").write_text("some text to train on, " * 50)
    base = ["train", "--model", str(tiny_gpt2), "--max_steps", "1", "--max_length", "32", "--no-progress"]
    cases = [
        (["--dataset", str(tmp_path / "data.txt"), "--output_dir", str(tmp_path), "--overwrite"],
         f"contains --dataset {str(tmp_path / 'data.txt')!r}"),
        (["--output_dir", str(tmp_path / "out"), "--logdir", str(tmp_path / "out" / "runs")],
         "is inside output_dir"),
        (["--output_dir", str(tmp_path / "data.txt" / "sub")], "is a file"),
    ]
    for extra, phrase in cases:
        assert cli_main(base + extra) == 2
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err, err
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert cli_main(base + ["--output_dir", ".", "--overwrite"]) == 2
    assert "contains the current directory" in capsys.readouterr().err
    assert (tmp_path / "data.txt").is_file() and not (tmp_path / "out").exists()


def test_output_dir_filled_during_the_run_is_not_replaced(tmp_path):
    """Without --overwrite an output directory that became non-empty while the run went on (another run wrote
    there) is left alone at commit; this run's outputs are kept beside it and the error says where."""
    from lora_fast.train_io import StagedDir

    final = tmp_path / "out"
    staged = StagedDir(final)
    (staged.path / "adapter_model.safetensors").write_text("this run")
    final.mkdir()
    (final / "other_run.txt").write_text("the other run")
    with pytest.raises(ConfigError, match="became non-empty") as e:
        staged.commit()
    assert [p.name for p in final.iterdir()] == ["other_run.txt"]
    kept = str(e.value).split("outputs are in ")[1].strip("'")
    assert (Path(kept) / "adapter_model.safetensors").read_text() == "this run"
    staged = StagedDir(final, overwrite=True)  # with --overwrite the replacement is what the user asked for
    (staged.path / "new.txt").write_text("new")
    staged.commit()
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def _killed_staging(*finals: Path) -> list[Path]:
    """The staging directories, one for each of ``finals``, that a process SIGKILLed while staging them left
    (nothing ran their cleanup)."""
    code = ("import os, signal, sys; from lora_fast.train_io import StagedDir\n"
            "for final in sys.argv[1:]:\n"
            "    s = StagedDir(final); (s.path / 'adapter_model.safetensors').write_text('partial')\n"
            "    print(s.path, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code, *map(str, finals)], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    return [Path(line) for line in p.stdout.split()]


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX: without it staging directories are never removed")
def test_staging_directories_of_killed_runs_are_removed(tmp_path):
    """A run killed outright (SIGKILL, the OOM killer) leaves its hidden staging directory (a merge's: a whole
    model) beside --output_dir, and they piled up. The next staging of that output removes those whose process is
    dead (their flock is free), with a warning naming them — never a live run's, one without the lock file (an
    older version's), another host's, nor another output's; a committed output holds no lock file. A sweep's (the
    runs it finished are inside, and a sweep does not resume) are named and kept."""
    from lora_fast.train_io import STAGING_LOCK, StagedDir

    final = tmp_path / "out"
    live = StagedDir(final)  # this process: alive
    ckpt = tmp_path / "ckpt"  # checkpoints: any step's is removed (a resumed run saves other steps)
    globbed, sweep = tmp_path / "run[lr=1e-4]", tmp_path / "sweep"  # a name glob would misread; a sweep's
    *dead, other, dead_ckpt, dead_globbed, dead_sweep, elsewhere = _killed_staging(
        final, final, tmp_path / "other", ckpt / "checkpoint-7", globbed, sweep, final)
    (elsewhere / STAGING_LOCK).write_text("another-host")  # its lock may be that host's alone: never judged here
    dead.sort()
    assert all((d / "adapter_model.safetensors").is_file() for d in dead)
    older = tmp_path / ".out.staging-older"
    older.mkdir()
    with pytest.warns(UserWarning, match=rf"removed 2 staging directories that killed runs left in .*"
                                         rf"\({re.escape(dead[0].name)}, {re.escape(dead[1].name)}\)"):
        staged = StagedDir(final)
    assert not any(d.exists() for d in dead)
    assert live.path.is_dir() and older.is_dir() and other.is_dir() and elsewhere.is_dir()
    with pytest.warns(UserWarning, match=f"removed 1 staging directory .*{re.escape(dead_globbed.name)}"):
        StagedDir(globbed).discard()
    assert not dead_globbed.exists()
    with pytest.warns(UserWarning, match=rf"kept 1 staging directory .*{re.escape(dead_sweep.name)}.* a killed sweep"):
        StagedDir(sweep, keep_stale=True).discard()
    assert (dead_sweep / "adapter_model.safetensors").read_text() == "partial"  # a finished run's, maybe
    (staged.path / "new.txt").write_text("new")
    staged.commit()
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    live.discard()
    with pytest.warns(UserWarning, match=f"removed 1 staging directory .*{re.escape(dead_ckpt.name)}"):
        StagedDir(ckpt / "checkpoint-9", overwrite=True, stale=".checkpoint-*.staging-*").discard()
    assert not list(ckpt.iterdir())


def test_cli_dispatch(capsys):
    assert cli_main(["--help"]) == 0 and "train" in capsys.readouterr().out
    assert cli_main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err
    import lora_fast

    assert cli_main(["--version"]) == 0 and capsys.readouterr().out == f"lora-fast {lora_fast.__version__}\n"
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0 and "--gradient_accumulation_steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # sweep's help shows its own default and no option it refuses
        cli_main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "(default: outputs/lora-sweep)" in out and "outputs/lora-gpt2" not in out
    assert "--save_steps" not in out and "--resume_from_checkpoint" not in out and "full: every combination" in out


# -------------------------------------------------------------------------------------------------------- data
def test_data_readers_and_split(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"document number {i}", "id": i}) for i in range(20)) + "\n")
    train, val, _ = load_texts(str(jl), val_fraction=0.1, seed=1)
    assert len(val) == 2 and len(train) == 18 and not set(train) & set(val)
    assert sorted(train + val) == sorted(f"document number {i}" for i in range(20))
    cs = tmp_path / "d.csv"
    cs.write_text("Label,Text\n0,alpha beta\n1,\"gamma, delta\"\n0,epsilon\n")
    train, val, _ = load_texts(str(cs), val_fraction=0.34, seed=0)
    assert sorted(train + val) == ["alpha beta", "epsilon", "gamma, delta"]
    with pytest.raises(ConfigError, match="no 'body' column"):
        load_texts(str(cs), text_column="body")
    train, val, src = load_texts(None)  # the embedded corpus: whole documents, none in both splits
    assert "pydoc_data" in src and len(val) >= 1 and not set(train) & set(val)
    assert sum(map(len, train + val)) > 400_000


# ----------------------------------------------------------------------------------------- model resolution
def test_gpt2_falls_back_to_random_124m_when_hub_unreachable(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    lines = []
    model, name = load_base_model("gpt2", seed=3, cache_dir=str(tmp_path), log=lines.append)
    assert name == "gpt2-random" and len(lines) == 1 and "unreachable" in lines[0] and "randomly" in lines[0]
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.n_positions) == (12, 768, 12, 50257, 1024)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small, tied embeddings counted once
    again, _ = load_base_model("gpt2-random", seed=3)  # the seed rebuilds the same base (lora-fast merge relies on it)
    assert torch.equal(again.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    with pytest.raises(ConfigError, match="cannot be downloaded"):  # only the default falls back
        load_base_model("gtp2", cache_dir=str(tmp_path), log=lines.append)
    assert len(lines) == 1


def test_merge_never_uses_random_weights_for_a_pretrained_base(tmp_path, monkeypatch, capsys):
    """An adapter recording base `gpt2` was trained on the pretrained weights: offline, `lora-fast merge` is an
    error (exit 2, nothing written), not a merge into the random stand-in that training may fall back to."""
    import functools

    from huggingface_hub import constants

    from lora_fast import apply_lora, save_adapter
    from lora_fast import cli as cli_module
    from lora_fast.train_model import random_gpt2

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setattr(cli_module, "load_base_model", functools.partial(load_base_model, cache_dir=str(cache)))
    model = apply_lora(random_gpt2("causal-lm", 2, 0), ["c_attn"], rank=2)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="gpt2")
    assert cli_main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "'gpt2' is not a local directory" in err and "randomly" not in err, err
    assert not (tmp_path / "merged").exists()


def test_merge_takes_a_legacy_bin_with_its_own_config(tmp_path, tiny_gpt2, capsys):
    """The tutorials' ``adapter_model.bin`` holding ``{"lora_state_dict", "config"}`` and no adapter_config.json:
    ``load_adapter`` reads it, and so does ``lora-fast merge`` (its base from ``--model``, the file naming none);
    the merged model computes the adapter's logits."""
    from transformers import GPT2LMHeadModel

    from lora_fast import apply_lora

    model = apply_lora(GPT2LMHeadModel.from_pretrained(tiny_gpt2), ["c_attn"], rank=4).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:
                p.normal_(0, 0.1)
    adapter = tmp_path / "legacy"
    adapter.mkdir()
    state = {k: v for k, v in model.state_dict().items() if ".lora.lora_" in k}
    torch.save({"lora_state_dict": state, "config": dict(model.lora_fast_config)}, adapter / "adapter_model.bin")
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m0")]) == 2
    assert "adapter_model.bin names no base model; pass --model" in capsys.readouterr().err
    assert cli_main(["merge", "--adapter", str(adapter), "--model", str(tiny_gpt2), "--output",
                     str(tmp_path / "merged")]) == 0
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert_rel_close(merged(ids).logits, model(ids).logits, 1e-5, "merged legacy adapter")

def test_merge_of_an_unreadable_legacy_bin_is_a_one_line_error(tmp_path, capsys):
    """An ``adapter_model.bin`` that torch.load refuses (not a torch file; a pickle of objects other than tensors)
    is an error of one line, as the CLI promises: torch's weights-only refusal is a paragraph of advice over
    several lines, which was printed whole; now its reason is."""
    import argparse

    adir = tmp_path / "adapter"
    adir.mkdir()
    for content in ("not a torch file", {"lora_state_dict": {}, "config": argparse.Namespace(r=2)}):
        if isinstance(content, str):
            (adir / "adapter_model.bin").write_text(content)
        else:
            torch.save(content, adir / "adapter_model.bin")
        assert cli_main(["merge", "--adapter", str(adir), "--output", str(tmp_path / "merged")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"{adir / 'adapter_model.bin'} holds objects" in err, err
        assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_non_finite_merge_and_expands_the_adapter_path(tmp_path, tiny_gpt2, capsys, monkeypatch):
    """An adapter holding NaN (a diverged run) was merged and saved with exit 0: refused by name, nothing written.
    ``--adapter ~/...`` is expanded as ``--output`` and ``--model`` are; a PEFT adapter (no tokenizer of its own)
    gets the base directory's tokenizer, so the merged model loads with AutoTokenizer."""
    from transformers import AutoTokenizer, GPT2LMHeadModel, GPT2TokenizerFast

    from lora_fast import apply_lora, lora_layers, save_adapter

    base = tmp_path / "base"
    GPT2LMHeadModel.from_pretrained(tiny_gpt2).save_pretrained(base)
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    GPT2TokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt")
                      ).save_pretrained(base)
    model = apply_lora(GPT2LMHeadModel.from_pretrained(base), ["c_attn"], rank=2)
    save_adapter(model, tmp_path / "home" / "good", base_model_name_or_path=str(base))
    with torch.no_grad():
        next(iter(lora_layers(model).values())).lora.lora_B[0, 0] = float("nan")
    save_adapter(model, tmp_path / "bad", base_model_name_or_path=str(base))
    assert cli_main(["merge", "--adapter", str(tmp_path / "bad"), "--output", str(tmp_path / "m-bad")]) == 2
    err = capsys.readouterr().err
    assert "transformer.h.0.attn.c_attn" in err and "inf/NaN" in err and "nothing written" in err, err
    assert not (tmp_path / "m-bad").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli_main(["merge", "--adapter", "~/good", "--output", str(tmp_path / "m-good")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "m-good").get_vocab() == \
        AutoTokenizer.from_pretrained(base).get_vocab()


def test_misspelt_hub_name_is_an_error(tmp_path, monkeypatch):
    import transformers

    from lora_fast import train_model

    def fake_from_pretrained(name, **kw):  # what transformers raises for a repository the hub does not have
        if kw.get("local_files_only"):
            raise OSError(f"{name} is not cached")
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'")

    monkeypatch.setattr(train_model, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    # the encoder check reads the config first: the same answer (it went to the network, ~20 s of retries here)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ConfigError, match="misspelt"):
        load_base_model("gtp2", cache_dir=str(tmp_path), log=pytest.fail)


def test_broken_local_model_dir_is_an_error(tmp_path, tiny_gpt2):
    import shutil

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_base_model(str(no_config))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="could not load the model"):
        load_base_model(str(broken))


def test_hub_dataset_name_offline_is_an_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"not a local file, the Hugging Face hub is not reachable \(offline\) and "
                       "datasets' cache has no copy"):  # real datasets, asked offline: nothing cached here
        load_texts("someone/some_corpus")


def test_classification_single_csv_split_and_string_labels(tmp_path):
    from lora_fast.data import load_classification

    f = tmp_path / "sms.csv"
    f.write_text("Label,Text\n" + "".join(f"{'spam' if i % 3 == 0 else 'ham'},message {i}\n" for i in range(50)))
    splits, names = load_classification(str(f), seed=0)
    assert names == ["ham", "spam"]
    assert {s: len(t) for s, (t, _) in splits.items()} == {"train": 35, "validation": 5, "test": 10}  # 70/10/20
    texts = [t for s in splits.values() for t in s[0]]
    assert sorted(texts) == sorted(f"message {i}" for i in range(50))
    for t, y in zip(*splits["train"], strict=True):
        assert y == (1 if int(t.split()[1]) % 3 == 0 else 0)
    with pytest.raises(ConfigError, match="no 'Label' or 'label' column"):
        (tmp_path / "nolabel.csv").write_text("Text\n" + "hello\n" * 20)
        load_classification(str(tmp_path / "nolabel.csv"))


def test_module_entry_point_exit_status(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lora_fast.train", "--rank", "0", "--output_dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "lora-fast train: error: rank must be a positive integer, got '0'"
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- review round 3: data, sweep
@pytest.mark.parametrize("seed", [0, 5])
def test_val_fraction_is_a_share_of_the_text(tmp_path, seed):
    """--val_fraction counts characters, not documents: one 38 KB document among two 2 KB ones used to go to
    validation whole (91 % of the text) for some seeds; two equal documents gave validation half. Every word stays
    in exactly one split."""
    f = tmp_path / "three.txt"
    docs = [" ".join(f"w{i}" for i in range(n)) for n in (9000, 500, 480)]
    f.write_text("\n\n".join(docs) + "\n")
    for text in (docs, docs[1:]):
        f.write_text("\n\n".join(text) + "\n")
        train, val, _ = load_texts(str(f), val_fraction=0.1, seed=seed)
        share = sum(map(len, val)) / sum(map(len, train + val))
        assert 0.05 <= share <= 0.12, share
        assert sorted(" ".join(train + val).split()) == sorted(" ".join(text).split())


def test_csv_bom_json_array_and_val_fraction_of_one_csv(tmp_path):
    from lora_fast.data import load_classification

    bom = tmp_path / "bom"  # Excel's "CSV UTF-8" starts with a byte-order mark; it is not part of the first header
    _write_csvs(bom, "\ufeffLabel,Text\nspam,win cash\nham,lunch at noon\n", "\ufeffLabel,Text\nham,see you\n")
    splits, names = load_classification(str(bom))
    assert names == ["ham", "spam"] and splits["validation"] == (["see you"], [0])
    arr = tmp_path / "docs.json"  # one JSON array of objects is accepted beside JSON lines
    arr.write_text(json.dumps([{"text": f"doc {i}"} for i in range(10)], indent=2))
    train, val, _ = load_texts(str(arr), val_fraction=0.2, seed=0)
    assert sorted(train + val) == sorted(f"doc {i}" for i in range(10)) and len(val) == 2
    f = tmp_path / "sms.csv"
    f.write_text("Label,Text\n" + "".join(f"{i % 2},message {i}\n" for i in range(50)))
    splits, _ = load_classification(str(f), seed=0, val_fraction=0.3)  # test share stays 20 %
    assert {s: len(t) for s, (t, _) in splits.items()} == {"train": 25, "validation": 15, "test": 10}
    with pytest.raises(ConfigError, match="val_fraction=0.85 leaves no training rows"):
        load_classification(str(f), val_fraction=0.85)
    with pytest.raises(ConfigError, match="the validation split is empty"):
        load_classification(str(f), val_fraction=0.01)


def test_collate_functions_pickle_for_dataloader_workers(tmp_path):
    """Workers on spawn platforms (macOS, Windows) pickle the DataLoader's collate_fn: no lambdas."""
    import pickle

    from lora_fast.data import train_bpe_tokenizer
    from lora_fast.distributed import DistContext
    from lora_fast.train import Prepared, _loaders

    blocks = torch.arange(64).view(4, 16)
    for task, data in (("causal-lm", {"train": blocks, "validation": blocks}),
                       ("classification", {"train": (["a b", "c d"], [0, 1]), "validation": (["a"], [0])})):
        opts = parse_train_args(["--task", task, "--batch_size", "2", "--max_length", "16"])
        tok = train_bpe_tokenizer(["a b c d"] * 4, 300) if task == "classification" else None
        loaders = _loaders(opts, Prepared(None, "m", tok, True, data, "src"), DistContext())
        fn = pickle.loads(pickle.dumps(loaders["train"].collate_fn))
        items = [loaders["train"].dataset[i] for i in range(2)]
        expect, got = loaders["train"].collate_fn(items), fn(items)
        assert expect.keys() == got.keys() and all(torch.equal(expect[k], got[k]) for k in expect)


def test_dataloader_workers_ignore_sigterm(tmp_path):
    """With --num_workers > 0 a SIGTERM to the whole process group must reach only the training loop (which
    saves), not kill the workers mid-batch: the workers' init ignores SIGTERM (checked in a real worker)."""
    import signal

    from lora_fast.distributed import DistContext
    from lora_fast.train import Prepared, _loaders, worker_ignores_sigterm

    blocks = torch.arange(64).view(4, 16)
    opts = parse_train_args(["--batch_size", "2", "--max_length", "16", "--num_workers", "1"])
    loader = _loaders(opts, Prepared(None, "m", None, True, {"train": blocks, "validation": blocks}, "src"),
                      DistContext())["train"]
    assert loader.worker_init_fn is worker_ignores_sigterm

    class Probe(torch.utils.data.Dataset):  # reports the SIGTERM disposition inside the worker process
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.tensor(int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN))

    probe = torch.utils.data.DataLoader(Probe(), num_workers=1, worker_init_fn=loader.worker_init_fn)
    assert next(iter(probe)).item() == 1
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process keeps its handler


def test_sweep_target_modules_used_or_refused(tmp_path, capsys):
    from lora_fast.sweep import build_parser, plan_runs, target_sets
    from lora_fast.train_args import resolve

    def sets(argv):
        ns = build_parser().parse_args(argv)
        return target_sets(ns, resolve(ns))

    assert sets([]) == [None, "all-linear"]  # None: the architecture's default targets (sweep.default_targets)
    assert sets(["--target_modules", "c_fc", "c_proj"]) == ["c_fc,c_proj"]  # was silently ignored
    cfg = tmp_path / "c.yaml"
    cfg.write_text("target_modules: [c_fc]\n")
    assert sets(["--config", str(cfg)]) == ["c_fc"]
    assert sets(["--target_modules", r"h\.\d+\.attn\.c_attn"]) == [r"h\.\d+\.attn\.c_attn"]
    runs = plan_runs([2], [16.0], [r"h\.\d+\.attn\.c_attn"], 4, 16.0, "one-at-a-time")
    assert [r["run"] for r in runs] == ["r4_a16_h_._d+_.attn_.c_attn", "r2_a16_h_._d+_.attn_.c_attn"]
    runs = plan_runs([], [], [".*(0).attn.c_attn", ".*[0].attn.c_attn"], 8, 16.0, "one-at-a-time")
    assert len({r["run"] for r in runs}) == 2  # both spellings sanitise alike: distinct directories anyway
    with pytest.raises(ConfigError, match="not both"):
        sets(["--target_modules", "c_fc", "--target_sets", "c_attn"])
    assert sets(["--config", str(cfg), "--target_sets", "c_attn"]) == ["c_attn"]  # the command line wins
    for bad in ("nan", "inf"):
        assert cli_main(["sweep", "--alphas", "16", bad, "--output_dir", str(tmp_path / "o")]) == 2
        assert f"--alphas: '{bad}' must be a positive finite number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028/U+2029/U+0085 raw inside strings; they are not record
    separators of JSON lines (splitlines() cut records there, and the reported line numbers drifted)."""
    f = tmp_path / "d.jsonl"
    texts = [f"doc {i} a\u2028b\u2029c\x85d" for i in range(6)]
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    train, val, _ = load_texts(str(f), val_fraction=0.2, seed=0)
    assert sorted(train + val) == sorted(texts)
    cr = tmp_path / "cr.jsonl"  # classic-Mac line ends: a raw CR cannot sit inside a JSON string
    cr.write_bytes(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\r" for i in range(5)))
    assert sorted(sum(load_texts(str(cr), val_fraction=0.2, seed=0)[:2], [])) == [f"doc {i}" for i in range(5)]
    f.write_text(f.read_text(encoding="utf-8") + "{broken\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 7 is not valid JSON"):
        load_texts(str(f))


def test_non_utf8_yaml_config_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("rank: 4\n# r\xe9sum\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        parse_train_args(["--config", str(cfg)])


def test_sweep_table_escapes_a_regex_alternation():
    from lora_fast.sweep import COLUMNS, _table_md

    row = {c: 1 for c in COLUMNS} | {"target_modules": ".*c_(attn|fc)"}
    line = _table_md([row]).splitlines()[2]
    assert line.replace("\\|", "").count("|") == len(COLUMNS) + 1 and "c_(attn\\|fc)" in line


def _bert_lm_with_wordpiece(path, special=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), bare=False):
    """A small BERT LM saved with a WordPiece tokenizer; ``bare``: one with no special token but UNK (a generic
    fast tokenizer: transformers 4 cannot build a BertTokenizerFast without SEP and CLS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertLMHeadModel, BertTokenizerFast, PreTrainedTokenizerFast

    words = "the a of to and in is it that for on with as was this by be are".split()
    tokens = [*special, *words, *"abcdefghijklmnopqrstuvwxyz"]
    path.mkdir(parents=True, exist_ok=True)
    if bare:
        core = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
        core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    else:
        (path / "vocab.txt").write_text("\n".join(tokens) + "\n")
        # from_pretrained reads vocab.txt (transformers 5's BertTokenizerFast(vocab_file=...) kept the specials only)
        tok = BertTokenizerFast.from_pretrained(path)
    torch.manual_seed(0)
    BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                               vocab_size=len(tok), max_position_embeddings=64, is_decoder=True)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_tokenizers_without_eos_or_pad(tmp_path, capsys):
    """A BERT-style tokenizer has no EOS: documents are joined with its SEP (it used to crash in lm_blocks with a
    TypeError); one with neither EOS nor SEP, or a classification run without any padding token, is a one-line
    error before training, exit 2, nothing written."""
    text = tmp_path / "d.txt"
    words = "the cat is on the mat and it was a good day for a walk".split()
    text.write_text("\n\n".join(" ".join(words[i % 7:] + words[:i % 7]) * 4 for i in range(30)))  # 7 distinct texts
    common = ["--max_steps", "1", "--batch_size", "2", "--max_length", "16", "--eval_batches", "1", "--no-progress",
              "--target_modules", "query", "value"]
    bert = _bert_lm_with_wordpiece(tmp_path / "bert")
    assert cli_main(["train", "--model", str(bert), "--dataset", str(text), *common,
                     "--output_dir", str(tmp_path / "o1")]) == 0
    bare = _bert_lm_with_wordpiece(tmp_path / "bare", special=("[UNK]",), bare=True)
    assert cli_main(["train", "--model", str(bare), "--dataset", str(text), *common,
                     "--output_dir", str(tmp_path / "o2")]) == 2
    assert "has no EOS (or SEP) token" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    cls = tmp_path / "cls"
    cls.mkdir()
    for split in ("train", "validation"):
        (cls / f"{split}.csv").write_text("Label,Text\n" + "".join(f"{i % 2},the cat {i}\n" for i in range(8)))
    assert cli_main(["train", "--task", "classification", "--model", str(bare), "--dataset", str(cls), *common,
                     "--output_dir", str(tmp_path / "o3")]) == 2
    assert "has no padding token" in capsys.readouterr().err and not (tmp_path / "o3").exists()


def test_weight_decay_spares_biases_and_norms(tmp_path, monkeypatch):
    """--weight_decay applies to matrices only (LoRA A/B, the head's weight), not to the head's bias: the HF
    Trainer's grouping. A BERT classifier's head has a bias (GPT-2's score has none)."""
    real, made = torch.optim.AdamW, []

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    bert = _bert_lm_with_wordpiece(tmp_path / "bert")
    cls = tmp_path / "cls"
    cls.mkdir()
    for split in ("train", "validation"):
        (cls / f"{split}.csv").write_text("Label,Text\n" + "".join(f"{i % 2},the cat {i}\n" for i in range(8)))
    assert cli_main(["train", "--task", "classification", "--model", str(bert), "--dataset", str(cls),
                     "--max_steps", "1", "--batch_size", "4", "--max_length", "16", "--weight_decay", "0.1",
                     "--target_modules", "query", "value", "--no-progress",
                     "--output_dir", str(tmp_path / "o")]) == 0
    groups = made[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim == 2 for p in groups[0]["params"]) and [p.ndim for p in groups[1]["params"]] == [1]


def test_hub_dataset_config_column_type_and_empty_validation(monkeypatch):
    """A hub dataset (simulated: no network here) takes NAME:CONFIG; a non-text column is a one-line error (it
    was an AttributeError on int.strip); a validation split without text falls back to a split of train (it was an
    IndexError in the tokenizer)."""
    import datasets

    from lora_fast import train_model

    calls = []

    def fake_load(path, config=None):
        calls.append((path, config))
        rows = {"text": [f"document {i} " * 5 for i in range(20)], "label": list(range(20))}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                     "validation": datasets.Dataset.from_dict({"text": ["", "  "], "label": [0, 1]})})

    monkeypatch.setattr(train_model, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, val, src = load_texts("someone/corpus:small", val_fraction=0.1, seed=0)
    assert calls == [("someone/corpus", "small")] and src == "datasets:someone/corpus:small"
    assert len(val) >= 1 and len(train) + len(val) == 20 and not set(train) & set(val)
    with pytest.raises(ConfigError, match="column 'label' holds .*not text"):
        load_texts("someone/corpus", text_column="label")


def test_tsv_with_an_unclosed_quote_is_named_not_swallowed(tmp_path):
    """In a TSV, a field that opens a quote and never closes it used to swallow the rest of the file into one
    document (249 rows became 3, silently); a quoted field holding newlines but no rows still reads."""
    f = tmp_path / "d.tsv"
    rows = [f"{i}\tsentence number {i} of the file" for i in range(10)]
    rows[3] = '3\t"an opening quote never closed'
    f.write_text("id\ttext\n" + "\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=r"row on line 5 has a field opening a quote"):
        load_texts(str(f))
    f.write_text('id\ttext\n0\t"two lines\nin one quoted field"\n' + "\n".join(rows[4:]) + "\n")
    train, val, _ = load_texts(str(f), val_fraction=0.2, seed=0)
    assert "two lines\nin one quoted field" in train + val and len(train + val) == 7
    import csv  # what csv.writer / pandas write: a quoted field of tab-indented code is no swallowed row
    code = "def f(x):\n\tif x:\n\t\treturn 1\n\treturn 0\tdone"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerows([["id", "text"], ["0", code], ["1", "plain"]])
    from lora_fast.data import read_text_file

    assert read_text_file(f) == [code, "plain"]


def test_text_column_without_columns_is_an_error(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("one paragraph\n\nanother one\n")
    with pytest.raises(ConfigError, match="--text_column 'body' is for JSON lines and CSV files"):
        load_texts(str(f), text_column="body")
    with pytest.raises(ConfigError, match="--text_column 'body' needs --dataset"):
        load_texts(None, text_column="body")


# ------------------------------------------------------------------------------- mutation audit: options, merge
@pytest.mark.parametrize("option, value, phrase", [
    ("--lr", "0", "lr must be a positive number, got '0'"),
    ("--epochs", "0", "epochs must be a positive number, got '0'"),
    ("--alpha", "0", "alpha must be a positive number, got '0'"),
    ("--dropout", "1", "dropout must be in [0, 1), got '1'"),
])
def test_zero_lr_epochs_and_dropout_one_are_refused_before_the_model(tmp_path, capsys, option, value, phrase):
    """Boundary values: lr, epochs and alpha must be > 0 and dropout < 1 (dropout 1 zeroes the LoRA input). The
    error names the option and comes before any model is loaded: the model directory here does not exist, and
    that is not what is reported."""
    out = tmp_path / "out"
    assert cli_main(["train", "--model", str(tmp_path / "no-such-model"), "--output_dir", str(out), "--no-progress",
                     option, value]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("lora-fast")]
    assert ours == [f"lora-fast train: error: {phrase}"], err
    assert not out.exists()


@pytest.mark.parametrize("targets", [["c_attn", "all-linear"], ["all-linear", "c_proj"], ["c_attn", r".*\.c_proj"]])
def test_target_modules_mixing_names_with_all_linear_or_a_regex_is_an_error(targets):
    """--target_modules takes module names, or one regex, or 'all-linear' alone: a mix has no single meaning
    (PEFT's target_modules is a list of names or one string), so it is refused rather than half-applied."""
    with pytest.raises(ConfigError, match="give either module names, or a single regex / 'all-linear'"):
        parse_train_args(["--target_modules", *targets])
    assert parse_train_args(["--target_modules", "c_attn", "c_proj"]).target_modules == ["c_attn", "c_proj"]


def test_target_modules_take_sweeps_comma_spelling_too():
    """``--target_modules c_attn,c_proj`` (how sweep's --target_sets spells a set) used to match no module: names
    never hold a comma, so it is the list; a regex's own comma (a {1,2} quantifier) stays inside the regex."""
    assert parse_train_args(["--target_modules", "c_attn,c_proj"]).target_modules == ["c_attn", "c_proj"]
    assert parse_train_args(["--target_modules", "c_attn,", "c_fc"]).target_modules == ["c_attn", "c_fc"]
    assert parse_train_args(["--target_modules", "c_attn, c_proj"]).target_modules == ["c_attn", "c_proj"]
    assert parse_train_args(["--target_modules", r"h\.[0-9]{1,2}\.attn\.c_attn"]).target_modules == \
        r"h\.[0-9]{1,2}\.attn\.c_attn"


def test_merge_rebuilds_gpt2_random_from_the_training_seed(tmp_path):
    """An adapter trained on ``gpt2-random`` is merged into the random GPT-2 drawn from the seed recorded in its
    training_args.json: the merged model gives the logits of that base (rebuilt by the library's own builder at
    that seed) with the adapter loaded. The adapter is made on a one-layer GPT-2 of the 124M model's width and
    vocabulary, targeting layer 0's c_attn only."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from lora_fast import apply_lora, load_adapter, lora_layers, save_adapter
    from lora_fast.train_model import random_gpt2

    seed = 7
    small = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=768, n_head=12, n_positions=16, bos_token_id=0,
                                       eos_token_id=0))  # GPT-2's vocabulary: another would save the embeddings
    apply_lora(small, r".*\.h\.0\.attn\.c_attn", rank=2, alpha=4)
    for layer in lora_layers(small).values():
        with torch.no_grad():
            layer.lora.lora_B.normal_(0, 0.05)  # B ≠ 0: the merge changes the weights
    adapter = save_adapter(small, tmp_path / "adapter", base_model_name_or_path="gpt2-random")
    (adapter / "training_args.json").write_text(json.dumps({"seed": seed}))
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ref = random_gpt2(seed=seed).eval()
    load_adapter(ref, adapter)
    ids = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert_rel_close(merged(input_ids=ids).logits, ref(input_ids=ids).logits, 1e-5, "merged vs seed-7 base")


def test_merge_of_a_gpt2_random_adapter_needs_its_seed(tmp_path, capsys):
    """The adapter files of a ``gpt2-random`` run copied without training_args.json were merged into the base of
    seed 0 (exit 0, a model computing something else: loss at untrained level in a user trial): refused, naming
    the way out; ``--seed`` gives the run's seed (the same model as a merge reading it from training_args.json),
    and a ``--seed`` that contradicts the record, or that no random base reads, is refused as well."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from lora_fast import apply_lora, lora_layers, save_adapter

    small = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=768, n_head=12, n_positions=16))
    apply_lora(small, r".*\.h\.0\.attn\.c_attn", rank=2, alpha=4)
    for layer in lora_layers(small).values():
        with torch.no_grad():
            layer.lora.lora_B.normal_(0, 0.05)
    copied = save_adapter(small, tmp_path / "copied", base_model_name_or_path="gpt2-random")  # no training_args
    assert cli_main(["merge", "--adapter", str(copied), "--output", str(tmp_path / "m0")]) == 2
    err = capsys.readouterr().err
    assert "gpt2-random" in err and "no training_args.json" in err and "--seed" in err, err
    assert not (tmp_path / "m0").exists()
    assert cli_main(["merge", "--adapter", str(copied), "--output", str(tmp_path / "m7"), "--seed", "7"]) == 0
    recorded = save_adapter(small, tmp_path / "recorded", base_model_name_or_path="gpt2-random")
    (recorded / "training_args.json").write_text(json.dumps({"seed": 7}))
    assert cli_main(["merge", "--adapter", str(recorded), "--output", str(tmp_path / "r7")]) == 0
    ids = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        by_flag, by_record = (AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()(input_ids=ids).logits
                              for d in ("m7", "r7"))
    assert torch.equal(by_flag, by_record)
    capsys.readouterr()
    assert cli_main(["merge", "--adapter", str(recorded), "--output", str(tmp_path / "r8"), "--seed", "8"]) == 2
    assert "--seed 8 but training_args.json records seed 7" in capsys.readouterr().err
    small.save_pretrained(tmp_path / "saved-base")  # (the adapter in place: only its config matters here)
    on_saved = save_adapter(small, tmp_path / "on-saved", base_model_name_or_path=str(tmp_path / "saved-base"))
    assert cli_main(["merge", "--adapter", str(on_saved), "--output", str(tmp_path / "s"), "--seed", "3"]) == 2
    assert "--seed rebuilds a gpt2-random base" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("r8", "s"))


@pytest.fixture(scope="module")
def seq_cls_adapter(tmp_path_factory):
    """A tiny GPT2ForSequenceClassification (3 labels) saved with save_pretrained, and a SEQ_CLS adapter of it
    (LoRA on c_attn with B ≠ 0, the score head saved whole): (base dir, adapter dir)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from lora_fast import apply_lora, lora_layers, save_adapter

    root = tmp_path_factory.mktemp("seq-cls")
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                                                     num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1))
    model.save_pretrained(root / "base")
    apply_lora(model, ["c_attn"], rank=2, alpha=4, modules_to_save=["score"])
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora.lora_B.normal_(0, 0.1)
    save_adapter(model, root / "adapter", base_model_name_or_path=str(root / "base"))
    return root / "base", root / "adapter"


def test_merge_saves_the_bases_tokenizer_without_touching_the_models_pad_id(seq_cls_adapter, tmp_path):
    """A classification adapter without a tokenizer of its own, onto a base directory whose tokenizer has no pad
    token: the merged directory gets that tokenizer, and the model keeps its pad_token_id (a batch of several
    sequences needs it), as without a tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer, GPT2TokenizerFast

    base, adapter = seq_cls_adapter
    shutil.copytree(base, tmp_path / "base")
    (tmp_path / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = GPT2TokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    assert tok.pad_token_id is None
    tok.save_pretrained(tmp_path / "base")
    assert cli_main(["merge", "--adapter", str(adapter), "--model", str(tmp_path / "base"), "--output",
                     str(tmp_path / "merged")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "merged").pad_token_id == 0
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").pad_token_id == 0  # the model's pad id: batches pad


@pytest.mark.parametrize("pad_id", [None, -1], ids=["no-pad-id", "negative-pad-id"])
def test_merge_gives_a_classifier_without_a_pad_token_one(tmp_path, pad_id):
    """A PEFT-style SEQ_CLS adapter of a GPT-2 classifier with no pad_token_id, whose base tokenizer has no pad
    token either: the merged model failed on any batch of two ("Cannot handle batch sizes > 1 if no padding token
    is defined"). Now it pads with EOS, as training does, and a padded batch gives each text's own logits.
    pad_token_id -1 (Llama-1's configs hold it: no pad token) is the same case: -1 was kept as the pad id, so the
    merged tokenizer could not pad a batch, and a tokenizer given a pad token by hand padded with ids the model never
    took for padding (it pooled the last pad token: other logits than the text's alone)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    from lora_fast import apply_lora, lora_layers, save_adapter
    from lora_fast.data import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a cat sat on a mat", "the dog ran"] * 5, 300)  # EOS "<|endoftext|>" is id 0
    tok.pad_token = None  # as GPT-2's own tokenizer: no pad token
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=16,
                                                     num_labels=2, bos_token_id=0, eos_token_id=0,
                                                     pad_token_id=pad_id))
    assert model.config.pad_token_id == pad_id and tok.pad_token_id is None
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    apply_lora(model, ["c_attn"], rank=2, modules_to_save=["score"])
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora.lora_B.normal_(0, 0.1)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    assert cli_main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    mtok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.config.pad_token_id == mtok.pad_token_id == 0
    texts = ["a cat sat on the mat", "dog"]
    with torch.no_grad():
        batch = merged(**mtok(texts, return_tensors="pt", padding=True)).logits
        alone = torch.cat([merged(**mtok([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


def test_merge_refuses_a_head_trained_to_inf_or_nan(seq_cls_adapter, tmp_path, capsys):
    """A SEQ_CLS adapter whose head (trained whole, modules_to_save) diverged: refused naming the head, nothing
    written (the LoRA layers' own check, safe_merge, does not see a head)."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, adapter = seq_cls_adapter
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    sd = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sd if ".score." in k)
    sd[key][0, 0] = float("inf")
    save_file(sd, bad / "adapter_model.safetensors")
    assert cli_main(["merge", "--adapter", str(bad), "--model", str(base), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "score" in err and "inf/NaN" in err and "nothing written" in err, err
    assert not (tmp_path / "m").exists()


def test_merge_without_task_type_keeps_the_saved_architecture(seq_cls_adapter, tmp_path):
    """A generic adapter (``task_type: null``, PEFT's plain PeftModel) of a base saved as a sequence classifier is
    merged into that class, not into a causal LM: the merged model's architectures are the base's and its logits
    are the base's with the adapter loaded."""
    import shutil

    from transformers import AutoConfig, GPT2ForSequenceClassification

    from lora_fast import load_adapter

    base, adapter = seq_cls_adapter
    generic = tmp_path / "generic"
    shutil.copytree(adapter, generic)
    cfg = json.loads((generic / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"]
    (generic / "adapter_config.json").write_text(json.dumps(cfg | {"task_type": None}))
    assert cli_main(["merge", "--adapter", str(generic), "--output", str(tmp_path / "merged")]) == 0
    archs = AutoConfig.from_pretrained(tmp_path / "merged").architectures
    assert archs == AutoConfig.from_pretrained(base).architectures == ["GPT2ForSequenceClassification"]
    merged = GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ref = GPT2ForSequenceClassification.from_pretrained(base).eval()
    load_adapter(ref, generic)
    ids = torch.randint(2, 512, (2, 10))
    with torch.no_grad():
        assert_rel_close(merged(input_ids=ids).logits, ref(input_ids=ids).logits, 1e-5, "merged classifier")


@pytest.mark.parametrize("n", ["1", "0"])
def test_merge_num_labels_below_two_is_refused(seq_cls_adapter, tmp_path, capsys, n):
    """--num_labels counts classes: fewer than two is no classifier, refused as such (exit 2, nothing written)."""
    _, adapter = seq_cls_adapter
    out = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(out), "--num_labels", n]) == 2
    err = capsys.readouterr().err
    assert f"lora-fast merge: error: --num_labels must be at least 2, got {n}" in err, err
    assert not out.exists()


def test_merge_label_count_contradicting_the_saved_head_names_both(seq_cls_adapter, tmp_path, capsys):
    """The saved head has 3 rows: a label count of 2 from --num_labels, or from training_args.json's
    label_names, is refused by a message naming the source, both counts and the adapter (not a shape mismatch
    deep in loading)."""
    import shutil

    _, adapter = seq_cls_adapter
    out = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(out), "--num_labels", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--num_labels gives 2 labels but the classification head saved in {adapter} has 3" in err, err
    named = tmp_path / "named"
    shutil.copytree(adapter, named)
    (named / "training_args.json").write_text(json.dumps({"seed": 0, "label_names": ["ham", "spam"]}))
    assert cli_main(["merge", "--adapter", str(named), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"training_args.json gives 2 labels but the classification head saved in {named} has 3" in err, err
    assert not out.exists()


def test_merge_into_a_base_with_fewer_embeddings_than_the_tokenizer_is_refused(tmp_path, tiny_gpt2, capsys):
    """``--model`` another base than the adapter's, whose embedding table is smaller than the adapter's tokenizer:
    the merge wrote a model that raised IndexError on the tokenizer's higher ids, with exit 0. Refused, naming
    both sizes and the recorded base, nothing written; into its own base the same adapter merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from lora_fast import apply_lora, save_adapter

    model = apply_lora(GPT2LMHeadModel.from_pretrained(tiny_gpt2), ["c_attn"], rank=2)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(tiny_gpt2))
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "c": 3, "d": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(adapter)  # 5 tokens
    small = tmp_path / "small-vocab"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=3, n_positions=64)).save_pretrained(small)
    assert cli_main(["merge", "--adapter", str(adapter), "--model", str(small), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "has 5 tokens" in err and "have 3 rows" in err and str(tiny_gpt2) in err, err
    assert not (tmp_path / "m").exists()
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "ok")]) == 0


def test_no_command_is_an_error_on_stderr_and_help_is_output(capsys):
    """`lora-fast` alone is a usage error (exit 2): its usage goes to stderr, as argparse's do; --help's to stdout."""
    assert cli_main([]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("usage: lora-fast")
    assert cli_main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: lora-fast") and not err


def test_sweep_grids_read_numbers_as_the_single_options_do():
    """--ranks 8.0 and 1e3 were refused while --rank took them."""
    from lora_fast.sweep import _numbers

    assert _numbers(["8.0", "1e3", "2"], int, "ranks") == [8, 1000, 2]
    with pytest.raises(ConfigError, match=r"--ranks: '2\.5' is not an integer"):
        _numbers(["2.5"], int, "ranks")


def test_an_output_dir_where_nothing_can_be_created_is_refused_before_loading(tmp_path, monkeypatch):
    """os.access said yes where nothing could be created (root on /proc, a read-only mount): the run loaded the model
    and data, then ended in a FileNotFoundError traceback when it made its staging directory. Now a creation is
    tried up front (simulated here: every mkdtemp fails as on a read-only filesystem)."""
    import errno
    import tempfile

    from lora_fast.train_io import check_creatable_dir

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(ConfigError, match=r"output_dir '.*out' cannot be written: nothing can be created in "
                                          r"'.*' \(Read-only file system\)"):
        check_creatable_dir(tmp_path / "out", "output_dir")


def test_merge_reads_the_label_count_from_the_head_among_saved_modules(tmp_path):
    """DistilBERT's modules_to_save ["classifier"] also saves pre_classifier (PEFT's suffix rule): two row counts
    (32 and 3), and merge said "no saved head; pass --num_labels". The classifier/score entry decides."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from lora_fast import apply_lora, save_adapter
    from lora_fast.cli import _saved_num_labels

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2,
                                                                 hidden_dim=64, num_labels=3))
    apply_lora(model, ["q_lin"], rank=2, modules_to_save=["classifier"])
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == ["classifier", "pre_classifier"]
    assert _saved_num_labels(tmp_path, cfg) == 3


def test_classification_data_errors_say_what_to_do(tmp_path):
    """A GLUE-style `sentence` column: the error names --text_column. A rare label that one file's split left out
    of train: the error says the split is by text and what to try."""
    from lora_fast.data import load_classification

    glue = tmp_path / "glue.csv"
    glue.write_text("label,sentence\n" + "".join(f"{i % 2},text {i}\n" for i in range(20)))
    with pytest.raises(ConfigError, match="--text_column names another"):
        load_classification(str(glue))
    assert load_classification(str(glue), text_column="sentence")[1] == ["0", "1"]
    rare = tmp_path / "rare.csv"
    rare.write_text("Label,Text\n" + "".join(f"{i % 2},text {i}\n" for i in range(99)) + "2,the rare one\n")
    refused = 0
    for seed in range(10):
        try:
            load_classification(str(rare), seed=seed)
        except ConfigError as e:
            refused += 1
            assert "try another --seed, or give train.csv/validation.csv/test.csv" in str(e)
    assert refused  # the lone "2" lands outside train for most seeds


# -------------------------------------------------------------------------- review: environments (locale, pipes, ~)
def test_training_messages_go_to_stderr_so_stdout_carries_only_results(tmp_path, tiny_gpt2, capsys):
    """Eval lines and notices went to stdout (tqdm.write's default) beside stderr's others: ``lora-fast train | head
    -1`` then ended the run with BrokenPipeError at the first eval, and nothing was saved. All of them are on stderr
    now; stdout holds the final summary only."""
    argv = _bad(tmp_path, tiny_gpt2, ["--eval_steps", "1", "--eval_batches", "1", "--batch_size", "2"])
    assert cli_main(argv) == 0
    cap = capsys.readouterr()
    assert "step 1: eval loss" in cap.err and "eval loss" not in cap.out.split("\n")[0]
    assert "step 1:" not in cap.out


def test_unwritable_messages_never_end_a_run(monkeypatch):
    """A message that cannot be written (stderr a closed pipe, a full disk) is dropped, not raised into the run."""
    from lora_fast.train_model import log_stderr

    class Broken:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stderr", Broken())
    log_stderr("a line")

    from tqdm import tqdm

    from lora_fast.train_model import Unfailing

    tqdm.write("a line", file=Unfailing(Broken()))  # training's lines above the bar
    bar_stream = Unfailing(Broken())  # the progress bar's own redraws (tqdm swallows only EIO)
    assert bar_stream.write("frame") == 0
    bar_stream.flush()


def test_a_stdout_closed_by_its_reader_ends_the_command_quietly(monkeypatch, tmp_path):
    """``lora-fast ... | head -1``: the reader closes the pipe, the next print raises BrokenPipeError; the command
    ends with the shell's SIGPIPE status (141) and no traceback (what was written stays written)."""
    sink = open(tmp_path / "sink", "w")  # noqa: SIM115 (its descriptor is redirected to /dev/null by the handler)

    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):  # what print left in the buffer cannot go either
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return sink.fileno()

    from lora_fast.cli import run_console

    monkeypatch.setattr("sys.stdout", Closed())
    assert run_console(cli_main, ["--version"]) == 141
    sink.close()
    monkeypatch.undo()

    def elsewhere(argv):  # a broken pipe that is not stdout's (a worker's queue, a socket): raised as it is
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        run_console(elsewhere)
    assert run_console(lambda argv: 0) == 0  # one process: returns (a torchrun rank leaves: test_distributed)


def test_python_dash_m_lora_fast_is_the_command():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lora_fast", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == f"lora-fast {lora_fast.__version__}\n", r.stderr


def test_non_ascii_paths_under_a_non_utf8_filesystem_encoding_are_refused_before_loading(tmp_path, tiny_gpt2):
    """LC_ALL=C with UTF-8 mode off: a non-ASCII --output_dir trained to the end and lost every output at the
    tokenizer's save (tokenizers rejects the undecodable bytes Python holds), a non-ASCII model name at the loss
    plot. Refused up front now, naming the option and the cure; nothing is written."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    enc = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"], env=env,
                         capture_output=True, text=True, timeout=60).stdout.strip()
    if enc.lower().replace("-", "") == "utf8":
        pytest.skip(f"this Python keeps a UTF-8 filesystem encoding under LC_ALL=C ({enc}); the unit check below "
                    "covers the rule everywhere")
    out = tmp_path / "résumé"
    argv = ["train", "--model", str(tiny_gpt2), "--max_steps", "2", "--output_dir", str(out), "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "lora_fast", *argv], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "not ASCII" in r.stderr and "PYTHONUTF8=1" in r.stderr, r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_path_encoding_rule(monkeypatch, tmp_path):
    from lora_fast.train_io import check_path_encoding

    paths = {"--output_dir": "out/résumé", "--model": "gpt2", "--logdir": None}
    check_path_encoding(paths)  # this interpreter's encoding (UTF-8 here, or the rule below)
    monkeypatch.setattr("sys.getfilesystemencoding", lambda: "ascii")
    with pytest.raises(ConfigError, match=r"--output_dir 'out/résumé': not ASCII, and Python's filesystem encoding"):
        check_path_encoding(paths)
    check_path_encoding({"--output_dir": "out/resume", "--model": "gpt2"})
    from lora_fast.train_io import check_output_dir

    out = tmp_path / "out"  # a dataset only Python reads is not refused
    assert check_output_dir(str(out), False, {"--dataset": "données.txt", "--model": "gpt2"}) == out.resolve()


def test_tilde_in_logdir_and_config_is_home(tmp_path, monkeypatch):
    """``--logdir=~/tb`` and ``--config=~/c.yaml`` (the shell expands no ~ after '='): the logs went to a literal
    ``./~`` directory, and the config was 'does not exist'. A directory given as --config is named as such."""
    pytest.importorskip("tensorboard", reason="--logdir writes TensorBoard events; tensorboard comes with [train]")
    from lora_fast.train import _tensorboard
    from lora_fast.train_args import load_yaml

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    writer = _tensorboard("~/tb", print)
    writer.close()
    assert (tmp_path / "home" / "tb").is_dir() and not (tmp_path / "~").exists()
    (tmp_path / "home" / "c.yaml").write_text("rank: 4\n")
    assert load_yaml("~/c.yaml") == {"rank": 4}
    with pytest.raises(ConfigError, match="is a directory; --config takes a YAML file"):
        load_yaml(str(tmp_path))


def test_sweep_table_is_ascii_for_an_ascii_stdout():
    """A failed or interrupted run's empty cells were '–' (U+2013): printing the table to an ASCII stdout
    (LC_ALL=C, PYTHONUTF8=0) raised UnicodeEncodeError at the end of the sweep (and lost its exit status 130)."""
    from lora_fast.sweep import COLUMNS, _table_md

    row = {c: None for c in COLUMNS} | {"run": "r4_a8", "status": "interrupted"}
    table = _table_md([row])
    assert table.isascii() and table.encode("ascii")


def test_merge_names_an_adapter_path_that_is_no_directory_and_a_causal_adapter_on_an_encoder(tmp_path, tiny_gpt2,
                                                                                              capsys):
    """``--adapter`` naming the config file itself read "has no adapter_config.json"; a missing path likewise. A
    causal-LM adapter merged onto an encoder was told to use "--task classification", an option merge lacks."""
    from transformers import BertConfig, BertForMaskedLM, GPT2LMHeadModel

    from lora_fast import apply_lora, save_adapter

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    apply_lora(model, ["c_attn"], rank=2)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_gpt2))
    for given, phrase in ((adapter / "adapter_config.json", "is a file; give the directory holding the adapter's"),
                          (tmp_path / "nowhere", "does not exist")):
        assert cli_main(["merge", "--adapter", str(given), "--output", str(tmp_path / "m")]) == 2
        assert f"--adapter {str(given)!r} {phrase}" in capsys.readouterr().err
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    capsys.readouterr()
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m"), "--model",
                     str(tmp_path / "bert")]) == 2
    err = capsys.readouterr().err
    assert "is an encoder (bert, not a causal decoder)" in err and "--task classification," not in err, err
    assert not (tmp_path / "m").exists()


def test_merge_into_another_base_than_the_adapters_says_so(tmp_path, tiny_gpt2, capsys):
    """``--model`` naming another model than the base the adapter records (same shapes: it loads) merged without a
    word; a note now names both. The recorded base itself, spelt as another path to it, gets none."""
    import shutil

    from transformers import GPT2LMHeadModel

    from lora_fast import apply_lora, save_adapter

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    apply_lora(model, ["c_attn"], rank=2)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_gpt2))
    other = shutil.copytree(tiny_gpt2, tmp_path / "other")
    capsys.readouterr()
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m1"), "--model", str(other)]) == 0
    err = capsys.readouterr().err
    assert f"--model {str(other)!r} is not the base this adapter records ({str(tiny_gpt2)!r})" in err, err
    (tmp_path / "link").symlink_to(tiny_gpt2)
    for given in (str(tiny_gpt2), str(tmp_path / "link")):
        out = tmp_path / f"m-{len(given)}"
        assert cli_main(["merge", "--adapter", str(adapter), "--output", str(out), "--model", given]) == 0
        assert "is not the base this adapter records" not in capsys.readouterr().err


def test_merge_under_torchrun_is_refused_before_anything_is_written(tmp_path, tiny_gpt2, capsys, monkeypatch):
    """``torchrun --nproc_per_node 2 -m lora_fast merge ...`` ran the merge on every rank into the one output: one
    rank wrote it, the other found it filled meanwhile, kept its own full copy of the merged model in a
    ``<output>.kept-*`` directory and failed the job (exit 1). Refused now, as ``lora-fast sweep`` is, on every
    rank, before the model loads: the merge runs in one process."""
    from transformers import GPT2LMHeadModel

    from lora_fast import apply_lora, save_adapter

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    apply_lora(model, ["c_attn"], rank=2)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_gpt2))
    capsys.readouterr()
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 2
        err = capsys.readouterr().err
        assert "lora-fast merge: error: lora-fast merge runs in one process" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no output, no staging, no kept copy
    monkeypatch.setenv("WORLD_SIZE", "1")  # a 1-process torchrun merges as a plain process
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
