"""``lora-fast sweep`` end to end on a tiny GPT-2: each run trains the setting its row reports, an interrupted
sweep keeps the runs so far and exits 130, and bad grid values are refused before anything is loaded or written.

Runs are one or two optimizer steps on a 40-paragraph corpus (its tokenizer trains in a fraction of a second),
single-threaded (tiny matmuls).
"""

from __future__ import annotations

import csv
import json
import random
import re

import pytest
import torch

import tests.test_cli as cli_tests
from lora_fast.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")
tiny_gpt2 = cli_tests.tiny_gpt2  # the CLI tests' fixture: a tiny GPT-2 saved locally


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the a cat dog sat ran on in mat park day good walk code data loop test model token".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 40))) for _ in range(40)))
    return path


def _sweep(tiny, corpus, out, *extra):
    return ["sweep", "--model", str(tiny), "--dataset", str(corpus), "--max_length", "16", "--batch_size", "2",
            "--eval_batches", "1", "--target_sets", "c_attn", "--output_dir", str(out), "--no-progress", *extra]


def _rows(out):
    with open(out / "sweep_results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_each_run_trains_the_alpha_and_rank_of_its_row(tiny_gpt2, corpus, tmp_path):
    """Every run directory holds an adapter whose config has the rank and alpha the table reports for that run
    (an alpha varied by the sweep, not the baseline --alpha)."""
    out = tmp_path / "sweep"
    assert cli_main(_sweep(tiny_gpt2, corpus, out, "--max_steps", "1", "--ranks", "2", "--rank", "2",
                           "--alpha", "4", "--alphas", "4", "32")) == 0
    rows = _rows(out)
    assert sorted(float(r["alpha"]) for r in rows) == [4.0, 32.0]
    for r in rows:
        cfg = json.loads((out / r["run"] / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"]) == (int(r["rank"]), float(r["alpha"])), r["run"]
        args = json.loads((out / r["run"] / "training_args.json").read_text())
        assert (args["rank"], args["alpha"]) == (int(r["rank"]), float(r["alpha"]))
        assert args["output_dir"] == str((out / r["run"]).resolve())  # not the staging directory it trained in


def test_interrupted_sweep_keeps_the_runs_so_far_and_exits_130(tiny_gpt2, corpus, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the first run's second step: that run's adapter and the table of the runs so far (one row)
    are written, the second run never starts, and the exit status is 130 (a script must not read it as done)."""
    calls = {"n": 0}
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_then_interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_clip(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupt)
    out = tmp_path / "sweep"
    rc = cli_main(_sweep(tiny_gpt2, corpus, out, "--max_steps", "3", "--ranks", "2", "--rank", "2",
                         "--alpha", "4", "--alphas", "4", "32"))
    assert rc == 130
    rows = _rows(out)
    assert len(rows) == 1 and int(rows[0]["steps"]) == 1
    m = json.loads((out / rows[0]["run"] / "training_metrics.json").read_text())
    assert m["interrupted"] and (out / rows[0]["run"] / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [rows[0]["run"]]  # no second run directory
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("at_run", [1, 2])
def test_an_interrupt_between_runs_keeps_the_finished_ones(tiny_gpt2, corpus, tmp_path, monkeypatch, capsys, at_run):
    """Ctrl-C / SIGTERM outside a run's training loop (while the next run copies and injects its model, say) used
    to discard every finished run: the table of the runs so far is written and the exit status is 130. Before the
    first run has finished, nothing is written."""
    import lora_fast.train as train_mod

    real_train, calls = train_mod.train, {"n": 0}

    def train_interrupted_at(opts, prep, log=None):
        calls["n"] += 1
        if calls["n"] == at_run:
            raise KeyboardInterrupt  # what SIGINT (or SIGTERM, under sigterm_as_interrupt) raises at that moment
        return real_train(opts, prep, log=log)

    monkeypatch.setattr(train_mod, "train", train_interrupted_at)
    out = tmp_path / "sweep"
    rc = cli_main(_sweep(tiny_gpt2, corpus, out, "--max_steps", "1", "--ranks", "2", "4", "--rank", "2",
                         "--alpha", "4", "--alphas", "4"))
    assert rc == 130 and calls["n"] == at_run
    err = capsys.readouterr().err
    if at_run == 1:
        assert "interrupted; nothing was written" in err and not out.exists()
    else:
        assert "interrupted after 1 of 2 runs" in err
        rows = _rows(out)
        assert [(r["rank"], r["status"]) for r in rows] == [("2", "ok")]
        assert (out / rows[0]["run"] / "adapter_model.safetensors").is_file() and (out / "sweep_results.md").is_file()
    assert not list(tmp_path.glob(".*staging*"))


def test_a_target_set_regex_may_hold_a_comma(tiny_gpt2, corpus, tmp_path):
    """A regex set with a comma ({1,2}) is one set (normalize_targets keeps it whole), not the two names the comma
    used to split it into (an error: neither half matched)."""
    regex = r".*\.h\.[0-9]{1,2}\.attn\.c_attn"
    out = tmp_path / "sweep"
    args = _sweep(tiny_gpt2, corpus, out, "--max_steps", "1", "--ranks", "2", "--rank", "2", "--alphas", "4",
                  "--alpha", "4")
    args[args.index("--target_sets") + 1] = regex
    assert cli_main(args) == 0
    (row,) = _rows(out)
    assert row["target_modules"] == regex and row["status"] == "ok"
    assert json.loads((out / row["run"] / "adapter_config.json").read_text())["target_modules"] == regex


@pytest.mark.parametrize("grid, value", [("--ranks", "0"), ("--alphas", "0"), ("--ranks", "-2")])
def test_non_positive_rank_or_alpha_is_refused_before_training(tiny_gpt2, corpus, tmp_path, capsys, grid, value):
    """A rank or alpha of 0 (or below) in the grid is a one-line error, exit 2, before any run: no output
    directory, no staging directory."""
    out = tmp_path / "sweep"
    assert cli_main(_sweep(tiny_gpt2, corpus, out, "--max_steps", "1", grid, value)) == 2
    err = capsys.readouterr().err
    assert f"lora-fast sweep: error: {grid}: '{value}' must be a positive finite number" in err, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*staging*"))


def test_a_failing_run_is_a_row_and_the_finished_runs_are_kept(tiny_gpt2, corpus, tmp_path, monkeypatch, capsys):
    """One run raising (out of memory at the largest rank, say) used to discard every finished run: now its row
    says "failed: ..." with no metrics, the other runs train and are written, and the exit status is 1."""
    import lora_fast.train as train_mod

    real_train = train_mod.train

    def train_failing_at_rank_8(opts, prep, log=None):
        if opts.rank == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_train(opts, prep, log=log)

    monkeypatch.setattr(train_mod, "train", train_failing_at_rank_8)
    out = tmp_path / "sweep"
    rc = cli_main(_sweep(tiny_gpt2, corpus, out, "--max_steps", "1", "--ranks", "2", "8", "4", "--rank", "2",
                         "--alpha", "4", "--alphas", "4"))
    assert rc == 1
    rows = {int(r["rank"]): r for r in _rows(out)}
    assert sorted(rows) == [2, 4, 8]
    assert rows[8]["status"] == "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"
    assert rows[8]["final_eval_loss"] == "" and not (out / rows[8]["run"]).exists()
    for r in (2, 4):  # the runs before and after the failure
        assert rows[r]["status"] == "ok" and float(rows[r]["final_eval_loss"]) > 0
        assert (out / rows[r]["run"] / "adapter_model.safetensors").is_file()
    assert (out / "sweep_plot.png").is_file() and "failed: OutOfMemoryError" in (out / "sweep_results.md").read_text()
    assert "1 of 3 runs failed" in capsys.readouterr().err


def test_an_option_the_first_run_refuses_is_a_one_line_error_and_nothing_is_written(tiny_gpt2, corpus, tmp_path,
                                                                                     monkeypatch, capsys):
    """An option only train() checks (--backend triton where Triton cannot run, say) made every run a "failed" row,
    exit 1, with an output directory of failures. The first run's refusal is now the sweep's: exit 2, nothing
    written. --distributed is refused before the model loads."""
    import lora_fast.train as train_mod
    from lora_fast.train_args import ConfigError

    def refusing(opts, prep, log=None):
        raise ConfigError("backend 'triton' needs ... (simulated)")

    monkeypatch.setattr(train_mod, "train", refusing)
    out = tmp_path / "sweep"
    assert cli_main(_sweep(tiny_gpt2, corpus, out, "--max_steps", "1", "--ranks", "2", "4")) == 2
    assert "lora-fast sweep: error: backend 'triton' needs ... (simulated)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*staging*"))
    assert cli_main(_sweep(tiny_gpt2, corpus, out, "--max_steps", "1", "--distributed", "ddp")) == 2
    assert "lora-fast sweep trains in one process" in capsys.readouterr().err and not out.exists()


def test_the_base_model_loads_under_the_seed_as_in_train(tiny_gpt2, corpus, tmp_path, monkeypatch):
    """Weights from_pretrained initialises itself (a checkpoint lacking some) followed torch's start-up seed in a
    sweep, so two identical sweeps differed from each other and from lora-fast train; run() seeds first."""
    import lora_fast.train as train_mod

    real, drawn = train_mod.load_base_model, []

    def load_base_model(*args, **kwargs):
        drawn.append(torch.rand(3))  # what a newly initialised weight would draw first
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "load_base_model", load_base_model)
    torch.manual_seed(12345)  # any state: the sweep must not depend on it
    assert cli_main(_sweep(tiny_gpt2, corpus, tmp_path / "sweep", "--max_steps", "1", "--ranks", "2", "--rank", "2",
                           "--alphas", "16", "--seed", "7")) == 0
    torch.manual_seed(7)
    assert torch.equal(drawn[0], torch.rand(3))


def test_grid_plan_refuses_ignored_baselines_and_merges_spellings_of_one_set(tiny_gpt2, corpus, tmp_path, capsys):
    """--grid full ignores --rank/--alpha (refused, not silent); one target set spelled several ways is one run."""
    from lora_fast.sweep import best_run, plan_runs

    assert cli_main(_sweep(tiny_gpt2, corpus, tmp_path / "s", "--grid", "full", "--rank", "16")) == 2
    assert "--grid full runs every combination" in capsys.readouterr().err
    runs = plan_runs([8], [16.0], ["c_attn,c_proj", "c_proj,c_attn", " c_attn,c_proj,", "c_fc"], 8, 16.0, "full")
    assert [r["targets"] for r in runs] == ["c_attn,c_proj", "c_fc"]
    rows = [{"run": n, "status": s, "final_eval_loss": v} for n, s, v in
            [("a", "ok", 3.0), ("b", "interrupted", 1.0), ("c", "failed: X", None), ("d", "ok", 2.5)]]
    assert best_run(rows)["run"] == "d" and best_run(rows[1:3]) is None


def test_sweep_help_describes_the_sweep():
    """sweep --help reused train's texts: --target_modules named train's default (c_attn), and --task / --distributed
    were offered though a sweep refuses them (still parsed, so the refusal names them)."""
    from lora_fast.sweep import build_parser

    text = build_parser().format_help()
    assert "default: the sets of --target_sets (the architecture's default targets vs all-linear)" in \
        " ".join(text.split())
    assert "--task {" not in text and "--task TASK" not in text and "--distributed" not in text
    assert build_parser().parse_args(["--task", "classification"]).task == "classification"


def test_train_and_sweep_without_matplotlib_are_refused_before_loading(tiny_gpt2, corpus, tmp_path, monkeypatch,
                                                                        capsys):
    """The base install has no matplotlib (``[train]`` brings it): a run trained to the end and then lost every
    output at the loss plot (sweep: every run "failed"). Both now refuse before the model loads, naming the extra."""
    import importlib.util

    import lora_fast.train as train_mod

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    loaded = []
    monkeypatch.setattr(train_mod, "load_base_model", lambda *a, **k: loaded.append(1))
    out = tmp_path / "sweep"
    assert cli_main(_sweep(tiny_gpt2, corpus, out, "--max_steps", "1", "--ranks", "2")) == 2
    assert "lora-fast sweep: error: matplotlib is not installed" in capsys.readouterr().err
    assert cli_main(["train", "--model", str(tiny_gpt2), "--dataset", str(corpus), "--max_steps", "1",
                     "--output_dir", str(tmp_path / "train"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lora-fast train: error: matplotlib is not installed" in err and "pip install 'lora-fast[train]'" in err
    assert not loaded and not out.exists() and not (tmp_path / "train").exists()


def test_the_grid_can_come_from_the_config_file(tiny_gpt2, corpus, tmp_path, capsys):
    """``--config`` takes the sweep's own options (``ranks``, ``alphas``, ``target_sets``, ``grid``): they were
    refused as unknown keys though ``--help`` promises a file of these options. A lone value is a list of one, a
    set may be a list of names; the command line wins; ``rank``/``alpha`` in the file with ``grid: full`` are
    refused as on the command line (they were ignored without a word), and so are both target options in the
    file."""
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("ranks: [2, 4]\nalphas: 8\ntarget_sets: [[c_attn, c_proj]]\ngrid: full\nmax_steps: 1\n")
    base = ["sweep", "--config", str(cfg), "--model", str(tiny_gpt2), "--dataset", str(corpus), "--max_length",
            "16", "--batch_size", "2", "--eval_batches", "1", "--no-progress"]
    assert cli_main([*base, "--output_dir", str(tmp_path / "a")]) == 0
    rows = _rows(tmp_path / "a")
    assert [(r["run"], int(r["rank"]), float(r["alpha"])) for r in rows] == [
        ("r2_a8_c_attn+c_proj", 2, 8.0), ("r4_a8_c_attn+c_proj", 4, 8.0)]
    assert cli_main([*base, "--ranks", "4", "--output_dir", str(tmp_path / "b")]) == 0  # the command line wins
    assert [r["run"] for r in _rows(tmp_path / "b")] == ["r4_a8_c_attn+c_proj"]
    capsys.readouterr()
    for extra, message in (("rank: 4\n", r"rank \(config file\) \(the one-at-a-time baseline\) would be ignored"),
                           ("target_modules: [c_fc]\n", "the config file gives both target_sets"),
                           ("grid: diagonal\n", None)):
        bad = tmp_path / "bad.yaml"
        text = cfg.read_text() + extra if message else cfg.read_text().replace("grid: full\n", extra)
        bad.write_text(text)
        assert cli_main([*base[:1], "--config", str(bad), *base[3:], "--output_dir", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert re.search(message or r"grid must be one of \['one-at-a-time', 'full'\], got 'diagonal'", err), err
        assert not (tmp_path / "c").exists()


def test_the_default_target_sets_are_the_architectures(tmp_path):
    """Without --target_sets/--target_modules a sweep compared ``c_attn`` with all-linear on every model: a
    Llama's sweep failed ("matched no module") where ``lora-fast train`` takes its default q_proj/v_proj. The first
    default set is the architecture's default targets (GPT-2: c_attn), named after the model loads."""
    import transformers

    from lora_fast.sweep import default_targets
    from lora_fast.train_args import ConfigError

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert default_targets(llama) == "q_proj,v_proj" and default_targets(gpt2) == "c_attn"
    toy = torch.nn.Module()
    toy.config = type("ToyConfig", (), {"model_type": "toy"})()
    with pytest.raises(ConfigError, match=r"no default target_modules for model_type='toy'.*--target_sets"):
        default_targets(toy)


def test_a_llama_sweep_compares_its_default_targets_with_all_linear(corpus, tmp_path):
    """End to end on a tiny Llama (no tokenizer saved: a BPE is trained on the corpus): the default sets are
    q_proj,v_proj and all-linear, each run's adapter targeting what its row names."""
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=64)).save_pretrained(tmp_path / "llama")
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--model", str(tmp_path / "llama"), "--dataset", str(corpus), "--max_length", "16",
                     "--batch_size", "2", "--eval_batches", "1", "--max_steps", "1", "--rank", "2", "--alpha", "8",
                     "--ranks", "2", "--alphas", "8", "--output_dir", str(out), "--no-progress"]) == 0
    rows = _rows(out)
    assert [(r["run"], r["target_modules"]) for r in rows] == [("r2_a8_q_proj+v_proj", "q_proj,v_proj"),
                                                               ("r2_a8_all-linear", "all-linear")]
    targets = [json.loads((out / r["run"] / "adapter_config.json").read_text())["target_modules"] for r in rows]
    assert sorted(targets[0]) == ["q_proj", "v_proj"]
    assert sorted(targets[1]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
