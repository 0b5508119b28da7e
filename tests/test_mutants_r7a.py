"""Tests written against mutants that survived the rest of the suite (round 7a of mutation testing: the command line
— ``sweep.py``, ``plots.py`` and ``cli.py``). Each pins a documented property (the README's ``lora-fast sweep`` and
``lora-fast merge`` paragraphs, the modules' docstrings) and names the mutation it kills.

The sweep tests run ``lora-fast sweep`` as a user does, with ``train.prepare`` and ``train.train`` stood in for (a
tiny GPT-2 built in memory; a run writes its ``training_args.json`` as ``train`` does and returns the metrics the
test asks for): what is tested is the sweep around the runs, in milliseconds. Nothing is downloaded."""

from __future__ import annotations

import csv
import json
import math
import signal
import socket
from pathlib import Path

import pytest
import torch

import lora_fast.train as T
from lora_fast.cli import main as cli_main
from lora_fast.train_args import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


class _Sweep:
    """``lora-fast sweep`` in ``tmp_path`` (the current directory) with ``prepare`` and ``train`` stood in for.
    ``behaviour(opts)`` gives a run's metrics beyond the defaults (or raises, as a failing run does); ``calls``
    holds each run's options, ``prepared`` counts the loads."""

    def __init__(self, monkeypatch, tmp_path):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
        self.tmp, self.calls, self.prepared = tmp_path, [], 0
        self.behaviour = lambda opts: None
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(T, "prepare", self._prepare)
        monkeypatch.setattr(T, "train", self._train)

    def _prepare(self, opts, log=None):
        self.prepared += 1
        return T.Prepared(model=self.model, base_name="tiny", tokenizer=None, tokenizer_trained=False, data={},
                          source="tiny")

    def _train(self, opts, prep, log=None):
        self.calls.append(opts)
        extra = self.behaviour(opts) or {}
        out = Path(opts.output_dir)
        out.mkdir(parents=True)
        (out / "training_args.json").write_text(json.dumps(vars(opts), default=str))  # as train records them
        loss = 3.0 + 1.0 / opts.rank
        m = {"parameters": {"trainable": 100 * opts.rank, "percentage": 0.1 * opts.rank}, "final_eval_loss": loss,
             "final_eval_step": 2, "final_perplexity": math.exp(loss), "train_tokens_per_sec": 1000.0,
             "peak_memory_mb": 1.0, "wall_time_s": 0.1, "steps": 2, "interrupted": False}
        m.update(extra)
        return m

    def __call__(self, *argv):
        return cli_main(["sweep", "--no-progress", *argv])

    def rows(self, out="outputs/lora-sweep"):
        with open(self.tmp / out / "sweep_results.csv", newline="") as f:
            return list(csv.DictReader(f))


@pytest.fixture
def sweep(monkeypatch, tmp_path):
    return _Sweep(monkeypatch, tmp_path)


ONE_RANK = ("--rank", "4", "--ranks", "4", "--alpha", "8", "--alphas", "8")  # with one target set: one run


# ------------------------------------------------------------------------------------------------ sweep: options
@pytest.mark.parametrize("yaml_text, phrase", [
    ("ranks: []\n", "ranks: an empty list"),
    ("alphas: []\n", "alphas: an empty list"),
    ("target_sets: [[c_attn, ' ']]\n", "target_sets: ['c_attn', ' '] is not a target-module set"),
    ("target_sets: ['  ']\n", "target_sets: '  ' is not a target-module set"),
])
def test_an_empty_grid_list_or_a_blank_set_in_the_config_file_is_refused(sweep, capsys, yaml_text, phrase):
    """A config file's grid list must hold something, and a target set a name: ``ranks: []`` swept no rank
    without a word (the one-at-a-time baseline alone), a set with a blank name ran the other names, and a blank
    set was refused as a bad ``target_modules``, an option the file does not hold. Refused before loading,
    naming the file's option.
    Kills S01 (``_listed``'s empty-list check dropped), S03 (``_target_set`` accepting a list with a blank name),
    S05 (``_target_set`` accepting a blank string)."""
    (sweep.tmp / "grid.yaml").write_text(yaml_text)
    assert sweep("--config", "grid.yaml") == 2
    err = capsys.readouterr().err
    assert f"lora-fast sweep: error: {phrase}" in err, err
    assert not sweep.prepared and not (sweep.tmp / "outputs").exists()


@pytest.mark.parametrize("yaml_text", ["target_sets: [c_proj, all-linear]\n",
                                       "target_sets: [c_proj, all-linear]\ntarget_modules: [c_attn]\n"])
def test_the_command_lines_target_modules_wins_over_the_config_files_target_options(sweep, capsys, yaml_text):
    """The sweep module's docstring: "across the two the command line wins, as everywhere" — ``--target_modules``
    on the command line is the one set of every run, whatever target options the file gives (a file giving both is
    refused only when the command line gives neither).
    Kills S12 (the file's ``target_sets`` taken over the command line's ``--target_modules``) and S11 (the file's
    both-options refusal made with ``--target_modules`` on the command line)."""
    (sweep.tmp / "grid.yaml").write_text(yaml_text)
    assert sweep("--config", "grid.yaml", "--target_modules", "c_fc", *ONE_RANK) == 0, capsys.readouterr().err
    assert [r["target_modules"] for r in sweep.rows()] == ["c_fc"]
    assert [c.target_modules for c in sweep.calls] == [["c_fc"]]


def test_three_target_sets_that_sanitise_alike_get_three_directories():
    """``plan_runs``: a run name replaces a regex's ``(``, ``[``, ``{`` by ``_``; sets spelled alike after that still
    get distinct directories (``-2``, ``-3``, ...), however many.
    Kills S22 (``while run in names`` -> ``if``: the third got the second's directory)."""
    from lora_fast.sweep import plan_runs

    sets = [r".*(0)\.c_attn", r".*[0]\.c_attn", r".*{0}\.c_attn"]
    runs = plan_runs([8], [16.0], sets, 8, 16.0, "one-at-a-time")
    assert [r["targets"] for r in runs] == sets
    assert len({r["run"] for r in runs}) == 3


def test_the_tables_and_the_command_keep_one_line_per_run_for_a_multi_line_error(sweep, capsys):
    """A run's error (a CUDA error's text runs over several lines) is its row's ``status``, "failed: <type>:
    <first line>": a newline there split the Markdown row in two and broke the table.
    Kills S30 (the whole message, newlines included, in ``status``)."""
    def behaviour(opts):
        if opts.rank == 8:
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    sweep.behaviour = behaviour
    assert sweep("--target_sets", "c_attn", "--rank", "4", "--ranks", "4", "8", "--alpha", "8", "--alphas", "8") == 1
    rows = sweep.rows()
    assert [r["status"] for r in rows] == ["ok", "failed: RuntimeError: CUDA error: out of memory"]
    md = (sweep.tmp / "outputs/lora-sweep/sweep_results.md").read_text().splitlines()
    assert len(md) == 2 + len(rows) and all(line.startswith("| ") for line in md[2:])


def test_a_target_set_matching_no_module_is_a_one_line_error_before_any_run(sweep, capsys):
    """Every run's target set is checked against the loaded model before the first run trains: one that matches
    nothing is a one-line error (exit 2, nothing written), not a traceback.
    Kills S33 (``check_rank``'s ValueError no longer turned into a ConfigError)."""
    assert sweep("--target_sets", "c_attn", "no_such_module", *ONE_RANK) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-fast sweep: error: ") and "no_such_module" in err and "Traceback" not in err
    assert not sweep.calls and not (sweep.tmp / "outputs").exists() and not list(sweep.tmp.rglob("*staging*"))


def test_a_killed_sweeps_staging_directory_is_named_and_kept(sweep):
    """README: a staging directory a killed run left is removed by the next run writing that output, but "a killed
    sweep's, which holds the runs it finished, is named and kept".
    Kills S34 (the sweep's ``StagedDir`` without ``keep_stale``: the finished runs deleted)."""
    from lora_fast.train_io import STAGING_LOCK

    dead = sweep.tmp / "outputs" / ".lora-sweep.staging-killed"
    (dead / "r8_a16_c_attn").mkdir(parents=True)
    (dead / STAGING_LOCK).write_text(socket.gethostname())  # its lock free: the sweep that held it is gone
    with pytest.warns(UserWarning, match=r"kept 1 staging directory .*\.lora-sweep\.staging-killed"):
        assert sweep("--target_sets", "c_attn", *ONE_RANK) == 0
    assert (dead / "r8_a16_c_attn").is_dir()


def test_diverged_runs_are_named_never_plotted_and_not_failures(sweep, capsys):
    """README: "a run whose eval loss is not finite has status ``diverged``"; ``Best:`` names a finished run only,
    and the plot holds the runs with a finite loss — none here, so no ``sweep_plot.png`` is written or announced. A
    diverged run trained to the end: it is no failed run (exit status 0, no "runs failed" line).
    Kills S48 (a non-finite loss reported "ok"), S36 (a non-finite loss plotted), S37 (a plot of no run),
    S65 (``sweep_plot.png`` announced without one), S72 (every status but "ok" counted as a failure)."""
    sweep.behaviour = lambda opts: {"final_eval_loss": float("nan") if opts.rank == 4 else float("inf"),
                                    "final_perplexity": float("inf")}
    assert sweep("--target_sets", "c_attn", "--rank", "4", "--ranks", "4", "8", "--alpha", "8", "--alphas", "8") == 0
    assert [r["status"].split(" ")[0] for r in sweep.rows()] == ["diverged", "diverged"]
    captured = capsys.readouterr()
    assert not (sweep.tmp / "outputs/lora-sweep/sweep_plot.png").exists()
    assert "sweep_plot.png" not in captured.out and "Best:" not in captured.out and "failed" not in captured.err


def test_a_stop_signal_while_the_table_is_written_keeps_the_table_and_exits_130(sweep, monkeypatch):
    """Ctrl-C while the tables are written lets the write finish (a signal then must not lose the finished runs),
    and the sweep still reports the interruption: exit status 130, as for any Ctrl-C of a sweep (README).
    Kills S38 (the held signal cleared without marking the sweep interrupted: exit 0)."""
    import os

    import lora_fast.train_io as io

    real = io.write_atomic

    def write_atomic(path, data):
        if Path(path).name == "sweep_results.md":
            os.kill(os.getpid(), signal.SIGINT)
        return real(path, data)

    monkeypatch.setattr(io, "write_atomic", write_atomic)
    assert sweep("--target_sets", "c_attn", *ONE_RANK) == 130
    assert [r["status"] for r in sweep.rows()] == ["ok"]


def test_each_run_logs_into_its_own_directory_under_logdir(sweep):
    """``--logdir`` of a sweep: each run writes its TensorBoard events into ``<logdir>/<run>``, so TensorBoard shows
    the runs side by side instead of one run's steps overwriting another's.
    Kills S42 (every run given ``--logdir`` itself)."""
    assert sweep("--target_sets", "c_attn", "--logdir", "tb", "--rank", "4", "--ranks", "4", "8", "--alpha", "8",
                 "--alphas", "8") == 0
    runs = [r["run"] for r in sweep.rows()]
    assert [Path(c.logdir) for c in sweep.calls] == [Path("tb") / r for r in runs] and len(set(runs)) == 2


def test_a_failing_first_run_and_a_later_runs_refusal_are_rows(sweep, capsys):
    """README: "A run that fails while training (CUDA out of memory at the largest rank, say) is a row whose status
    names the error; the other runs go on and are kept, and the exit status is 1" — the first run's failure
    included; only an option the first run refuses (a ConfigError, which every run would raise) ends the sweep.
    A later run's ConfigError (one rank's setting refused) is that run's row.
    Kills S44 (any failure of the first run ending the sweep: a traceback) and S43 (a later run's ConfigError
    ending it: exit 2, the finished runs discarded)."""
    def behaviour(opts):
        if opts.rank == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if opts.rank == 8:
            raise ConfigError("rank 8 refused (simulated)")

    sweep.behaviour = behaviour
    assert sweep("--target_sets", "c_attn", "--rank", "2", "--ranks", "2", "4", "8", "--alpha", "8",
                 "--alphas", "8") == 1
    rows = sweep.rows()
    assert [r["status"].split(":")[0] for r in rows] == ["failed", "ok", "failed"]
    assert (sweep.tmp / "outputs/lora-sweep" / rows[1]["run"] / "training_args.json").is_file()
    assert "2 of 3 runs failed" in capsys.readouterr().err


def test_a_relative_output_dir_is_recorded_as_the_runs_absolute_directory(sweep):
    """Each run's ``training_args.json`` names its final directory (not the staging one it trained in), absolute:
    a relative ``--output_dir`` is relative to where the sweep ran, which a later reader of the file does not share.
    Kills S47 (``<output_dir>/<run>`` recorded as given: a relative path)."""
    assert sweep("--target_sets", "c_attn", "--output_dir", "sw", *ONE_RANK) == 0
    (row,) = sweep.rows("sw")
    args = json.loads((sweep.tmp / "sw" / row["run"] / "training_args.json").read_text())
    assert args["output_dir"] == str((sweep.tmp / "sw" / row["run"]).resolve())


def test_a_row_reports_its_final_evaluations_step_and_an_interrupted_run(sweep, capsys):
    """The table's ``final_eval_step`` is the step the final eval loss was taken at (not the steps trained), an
    interrupted run's status is ``interrupted`` (its loss is not the finished run's), ``Best:`` names the finished
    run with the lowest loss, and a sweep stopped by Ctrl-C exits 130 even when a run failed before (README:
    "Ctrl-C or SIGTERM stops the sweep and writes the table of the finished runs (exit status 130)").
    Kills S50 (``final_eval_step`` from ``steps``), S49 (an interrupted run reported "ok"), S62 (the ``Best:``
    label dropped), S64 (exit 1 for a sweep both failed and interrupted)."""
    def behaviour(opts):
        if opts.rank == 4:
            return {"final_eval_step": 3, "steps": 4}
        if opts.rank == 8:
            raise RuntimeError("simulated")
        return {"interrupted": True, "final_eval_loss": 0.5, "steps": 1, "final_eval_step": 1}

    sweep.behaviour = behaviour
    assert sweep("--target_sets", "c_attn", "--rank", "4", "--ranks", "4", "8", "16", "--alpha", "8",
                 "--alphas", "8") == 130
    rows = sweep.rows()
    assert [(r["rank"], r["status"].split(":")[0]) for r in rows] == [("4", "ok"), ("8", "failed"),
                                                                     ("16", "interrupted")]
    assert (rows[0]["final_eval_step"], rows[0]["steps"]) == ("3", "4")
    best = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Best: ")]
    assert len(best) == 1 and best[0].startswith(f"Best: {rows[0]['run']} ")


def test_the_config_files_output_dir_is_the_sweeps(sweep):
    """``output_dir`` in ``--config`` is where the sweep writes, as every option of the file (the default
    ``outputs/lora-sweep`` only when neither the command line nor the file gives one).
    Kills S53 (the default taken whenever the command line gives none)."""
    (sweep.tmp / "grid.yaml").write_text("output_dir: from-config\n")
    assert sweep("--config", "grid.yaml", "--target_sets", "c_attn", *ONE_RANK) == 0
    assert len(sweep.rows("from-config")) == 1 and not (sweep.tmp / "outputs").exists()


@pytest.mark.parametrize("argv, phrase", [
    (("--task", "classification"), "lora-fast sweep runs --task causal-lm only"),
    (("--target_sets", "c_attn,all-linear"), "target_modules"),
    (("--device", "cpu", "--tf32"), "--tf32 needs a CUDA GPU"),
    (("--output_dir", "sw", "--logdir", "sw/tb"), "--logdir 'sw/tb' is inside"),
])
def test_what_a_sweep_refuses_is_refused_before_loading(sweep, capsys, argv, phrase):
    """Options a sweep cannot run are one-line errors before the model and data load (minutes on a real model):
    another ``--task`` (a sweep is causal-lm), a malformed target set, ``--tf32`` off a CUDA GPU, a ``--logdir``
    inside the output directory (the runs' logs would be replaced with it).
    Kills S56 (``--task`` unchecked), S59 (sets checked only after loading), S68 (``check_tf32`` not called),
    S69 (``--logdir`` not checked against ``--output_dir``)."""
    assert sweep(*argv, *ONE_RANK) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-fast sweep: error: ") and phrase in err, err
    assert not sweep.prepared and not sweep.calls


# ------------------------------------------------------------------------------------------------ plots
@pytest.fixture
def drawn(monkeypatch):
    """The figures ``plots`` saves, kept (and not written) for their axes to be read."""
    from lora_fast import plots

    figs = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path, **kw: figs.append(fig))
    return figs


def test_the_loss_curve_puts_each_loss_at_its_optimizer_step(drawn, tmp_path):
    """``training_loss_curve.png``: the train loss of optimizer step k at x = k (steps count from 1, as
    ``eval_steps`` and ``final_eval_step`` do), the eval loss at the steps it was taken — one evaluation too — and
    a legend telling the two apart; the figure is closed once saved (a sweep draws one per run).
    Kills P04 (train loss from x = 0), P05 (eval loss at x = 0, 1, ...), P11 (a single evaluation not drawn),
    P12 (no legend), P10 (the figure left open)."""
    import matplotlib.pyplot as plt

    from lora_fast.plots import loss_curve

    open_before = plt.get_fignums()
    loss_curve(tmp_path / "a.png", [3.0, 2.5, 2.25, 2.0], [2, 4], [2.6, 2.1])
    loss_curve(tmp_path / "b.png", [3.0, 2.5], [2], [2.4])
    assert plt.get_fignums() == open_before
    for fig, eval_at, eval_loss in ((drawn[0], [2, 4], [2.6, 2.1]), (drawn[1], [2], [2.4])):
        (ax,) = fig.axes
        train, *evals = ax.get_lines()
        assert list(train.get_xdata()) == list(range(1, len(train.get_ydata()) + 1))
        assert [(list(e.get_xdata()), list(e.get_ydata())) for e in evals] == [(eval_at, eval_loss)]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "eval loss"]


def test_the_sweep_plot_is_loss_against_trainable_parameters_by_run(drawn, tmp_path):
    """``sweep_plot``'s docstring and title: each run's final eval loss (y) against its trainable parameters (x, log
    scale), labelled by run, marker ``o`` for named target modules and ``s`` for all-linear.
    Kills P07 (axes swapped), P08 (linear x), P09 (labelled by target set), P06 (one marker for all)."""
    from matplotlib.markers import MarkerStyle

    from lora_fast.plots import sweep_plot

    rows = [{"run": "r4_a8_c_attn", "target_modules": "c_attn", "trainable_params": 1000, "final_eval_loss": 3.25},
            {"run": "r4_a8_all-linear", "target_modules": "all-linear", "trainable_params": 50000,
             "final_eval_loss": 3.0}]
    sweep_plot(tmp_path / "s.png", rows)
    (ax,) = drawn[0].axes
    assert ax.get_xscale() == "log"
    assert [c.get_offsets().tolist() for c in ax.collections] == [[[1000, 3.25]], [[50000, 3.0]]]
    assert [t.get_text() for t in ax.texts] == [r["run"] for r in rows]

    def marker(m):
        style = MarkerStyle(m)
        return style.get_path().transformed(style.get_transform()).vertices.tolist()

    assert [c.get_paths()[0].vertices.tolist() for c in ax.collections] == [marker("o"), marker("s")]


def test_plots_draw_with_agg_whatever_backend_was_chosen(drawn, tmp_path):
    """``plots``: "matplotlib, Agg backend: no display needed" — a backend chosen before (a matplotlibrc's
    interactive one, which needs a display a training node lacks) is switched to Agg for the plots.
    Kills P02 (``matplotlib.use("Agg", force=True)`` dropped)."""
    import matplotlib

    from lora_fast.plots import loss_curve

    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg", force=True)
        loss_curve(tmp_path / "a.png", [3.0, 2.5], [], [])
        assert matplotlib.get_backend().lower() == "agg"
    finally:
        matplotlib.use(before, force=True)


# ------------------------------------------------------------------------------------------------ merge
def _classifier_adapter(root: Path, modules_to_save=("score",), vocab_size=64, **ids) -> Path:
    """A PEFT-style SEQ_CLS adapter (3 labels, no tokenizer, no training_args.json) of a tiny GPT-2 classifier saved
    in ``root/base`` with the special-token ``ids`` given; returns the adapter directory."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from lora_fast import apply_lora, save_adapter

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab_size,
                                                     n_positions=16, num_labels=3, **ids))
    model.save_pretrained(root / "base")
    apply_lora(model, ["c_attn"], rank=2, modules_to_save=list(modules_to_save))
    save_adapter(model, root / "adapter", base_model_name_or_path=str(root / "base"))
    return root / "adapter"


@pytest.mark.parametrize("ids, expected", [
    ({"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}, (0, 1, 2)),
    ({"pad_token_id": None, "eos_token_id": 1, "bos_token_id": 2}, (1, 1, 2)),
    ({"pad_token_id": None, "eos_token_id": [1, 3], "bos_token_id": 2}, (None, [1, 3], 2)),
])
def test_merge_pads_a_classifier_without_a_pad_id_with_its_eos_and_keeps_its_other_ids(tmp_path, ids, expected):
    """README (merge): "for a classifier without a pad token, pads with EOS as training does" — the model's own EOS
    when no tokenizer comes with it; one that has a pad id keeps it, and the EOS and BOS ids stay as saved. A list
    of EOS ids is no pad id (``pad_token_id`` is one token).
    Kills C02 (a pad id replaced by EOS), C03 (no EOS fallback without a tokenizer), C05 (the EOS written over BOS
    too), C04 (a list of EOS ids made the pad id)."""
    from transformers import AutoConfig

    adapter = _classifier_adapter(tmp_path, **ids)
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    cfg = AutoConfig.from_pretrained(tmp_path / "merged")
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == expected


def _fake_adapter(adir: Path, cfg: dict, shapes: dict) -> Path:
    """An adapter directory holding ``cfg`` and zero tensors of ``shapes`` (module name -> shape, keys under
    PEFT's ``base_model.model.`` prefix)."""
    from safetensors.torch import save_file

    adir.mkdir(parents=True, exist_ok=True)
    (adir / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({f"base_model.model.{k}": torch.zeros(s) for k, s in shapes.items()}, adir / "adapter_model.safetensors")
    return adir


@pytest.mark.parametrize("saved, shapes, expected", [
    (["score", "transformer.wte"], {"score.weight": (3, 16), "transformer.wte.weight": (64, 16)}, 3),
    (["classification_head"], {"classification_head.dense.weight": (16, 16),
                               "classification_head.out_proj.weight": (4, 16)}, 4),
    (["classifier", "score"], {"classifier.weight": (3, 16), "score.weight": (5, 16)}, None),
])
def test_the_label_count_is_read_from_the_saved_head_and_only_when_it_is_unambiguous(tmp_path, saved, shapes,
                                                                                     expected):
    """``_saved_num_labels``: the rows of the head the adapter saved — the module named ``score`` or ``classifier``
    among ``modules_to_save`` (an embedding saved beside it is no head), else any saved module's (a BART-style
    ``classification_head.out_proj``); two heads of different sizes tell nothing (None: ``--num_labels`` is asked
    for).
    Kills C06 (``score`` not taken as a head), C07 (no fallback to the other saved modules), C08 (one of two
    disagreeing heads picked)."""
    from lora_fast.cli import _saved_num_labels

    cfg = {"task_type": "SEQ_CLS", "modules_to_save": saved}
    assert _saved_num_labels(_fake_adapter(tmp_path / "a", cfg, shapes), cfg) == expected


def test_num_labels_contradicting_the_recorded_label_names_is_refused(tmp_path):
    """``--num_labels`` and training_args.json's ``label_names`` must agree, also when no head was saved to compare
    them with: the names were taken and ``--num_labels`` ignored without a word.
    Kills C12 (the ``--num_labels`` / ``label_names`` comparison dropped)."""
    from lora_fast.cli import _num_labels

    cfg = {"task_type": "SEQ_CLS", "modules_to_save": None}
    adir = _fake_adapter(tmp_path / "a", cfg, {})
    assert _num_labels(adir, cfg, {"label_names": ["neg", "pos"]}, None) == ["neg", "pos"]
    with pytest.raises(ConfigError, match="--num_labels 3 but training_args.json names 2 labels"):
        _num_labels(adir, cfg, {"label_names": ["neg", "pos"]}, 3)


def test_the_auto_mapping_class_is_used_only_when_transformers_exports_it():
    """``_mapped_class``: ``class:<Name>`` for the ``auto_mapping`` class when its library is transformers and
    transformers exports it; None otherwise (a class of another library of the same name, or one transformers
    lacks), so that the base loads as saved instead.
    Kills C09 (the library not checked), C10 (the class not checked)."""
    from lora_fast.cli import _mapped_class

    def mapped(name, library):
        return _mapped_class({"auto_mapping": {"base_model_class": name, "parent_library": library}})

    assert mapped("GPT2ForSequenceClassification", "transformers.models.gpt2.modeling_gpt2") == \
        "class:GPT2ForSequenceClassification"
    assert mapped("GPT2ForSequenceClassification", "my_models.gpt2") is None
    assert mapped("NoSuchModelForAnything", "transformers.models.gpt2.modeling_gpt2") is None


@pytest.mark.parametrize("files, phrase", [
    ({"adapter_config.json": "{", "adapter_model.safetensors": ""}, "unreadable JSON"),
    ({"adapter_config.json": "{}", "training_args.json": "{\"seed\": "}, "unreadable JSON"),
    ({"adapter_model.bin": "not a torch file"}, "adapter_model.bin"),
])
def test_an_unreadable_adapter_is_a_one_line_error(tmp_path, capsys, files, phrase):
    """A damaged adapter directory (a truncated JSON, a legacy ``adapter_model.bin`` that is no torch file) is a
    one-line error, exit status 2 (the CLI's promise for bad input), not a traceback; nothing is written.
    Kills C16 (a JSON error not turned into a ConfigError), C15 (nor a legacy file's ValueError)."""
    adir = tmp_path / "adapter"
    adir.mkdir()
    for name, text in files.items():
        (adir / name).write_text(text)
    assert cli_main(["merge", "--adapter", str(adir), "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-fast merge: error: ") and phrase in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "merged").exists()


def test_an_output_inside_the_adapter_directory_is_refused(tmp_path, capsys):
    """``merge``'s docstring: ``--output`` is never the adapter directory, inside it, or containing it.
    Kills C20 (an output inside the adapter let through)."""
    adir = _fake_adapter(tmp_path / "adapter", {"base_model_name_or_path": "gpt2", "task_type": "CAUSAL_LM"}, {})
    assert cli_main(["merge", "--adapter", str(adir), "--output", str(adir / "merged")]) == 2
    assert "overlap" in capsys.readouterr().err and not (adir / "merged").exists()


@pytest.mark.parametrize("cfg, argv, output_holds_a_file, phrase", [
    ({"task_type": "SEQ_CLASSIFICATION"}, (), False, "task_type 'SEQ_CLASSIFICATION' is not one of PEFT's"),
    ({"task_type": "CAUSAL_LM"}, ("--num_labels", "3"), False, "--num_labels is for classification"),
    ({"task_type": "CAUSAL_LM"}, (), True, "--output "),
])
def test_merge_refuses_what_it_cannot_do_before_loading_in_its_own_words(tmp_path, capsys, cfg, argv,
                                                                          output_holds_a_file, phrase):
    """One-line errors before the base model loads: a task type PEFT does not have (a KeyError traceback), a
    ``--num_labels`` a causal-LM adapter has no use for (ignored without a word), and a non-empty ``--output``
    named by merge's own option (not train's ``output_dir``).
    Kills C22 (the task-type check dropped), C24 (``--num_labels`` unchecked), C21 (the output check's ``flag``)."""
    adir = _fake_adapter(tmp_path / "adapter", {"base_model_name_or_path": "gpt2", **cfg}, {})
    out = tmp_path / "merged"
    if output_holds_a_file:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    assert cli_main(["merge", "--adapter", str(adir), "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-fast merge: error: ") and phrase in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] if output_holds_a_file else not out.exists()


@pytest.mark.parametrize("trained", [True, False])
def test_merge_writes_the_recorded_label_names_and_the_adapter_tokenizers_ids(tmp_path, trained):
    """A lora-fast classification adapter: the merged config's ``id2label``/``label2id`` are training_args.json's
    ``label_names`` (README: ``lora-fast merge`` writes them), and its special-token ids are the ones training set
    from the adapter's tokenizer: the pad id its (GPT-2 pools the last non-pad token), and with a tokenizer trained
    for the run (``tokenizer_trained``) EOS/BOS too, in config and generation config (not GPT-2's 50256, past a
    small vocabulary). The tokenizer saved is the adapter's, not one beside the base, and one with as many tokens
    as the model has embeddings is no mismatch.
    Kills C26 (``id2label`` not written), C56 (``label2id`` not written), C25 (the trained tokenizer's ids not
    set), C27 (the base's pad id kept over the adapter tokenizer's), C28 (the base's tokenizer saved over the
    adapter's), C30 (a tokenizer as large as the embedding table refused)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, GPT2TokenizerFast

    from lora_fast.data import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a cat sat on a mat", "the dog ran"] * 5, 300)
    assert tok.pad_token_id not in (None, 5)
    adapter = _classifier_adapter(tmp_path, vocab_size=len(tok), pad_token_id=5)  # EOS/BOS: GPT-2's 50256
    tok.save_pretrained(adapter)
    (tmp_path / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    GPT2TokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt")
                      ).save_pretrained(tmp_path / "base")  # another tokenizer beside the base
    labels = ["neg", "neutral", "pos"]
    (adapter / "training_args.json").write_text(json.dumps({"label_names": labels, "tokenizer_trained": trained}))
    assert cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    cfg = AutoConfig.from_pretrained(tmp_path / "merged")
    assert cfg.id2label == dict(enumerate(labels)) and cfg.label2id == {n: i for i, n in enumerate(labels)}
    assert cfg.pad_token_id == tok.pad_token_id
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == len(tok)
    eos = tok.eos_token_id if trained else 50256
    assert (cfg.eos_token_id, cfg.bos_token_id) == (eos, eos)
    if (tmp_path / "merged" / "generation_config.json").is_file():  # a classifier may have none
        gen = GenerationConfig.from_pretrained(tmp_path / "merged")
        assert (gen.eos_token_id, gen.bos_token_id) == (eos, eos)


def test_merge_without_a_task_type_loads_the_class_auto_mapping_names_before_the_saved_one(tmp_path):
    """README (merge): an adapter without a task type is merged "as the class the adapter's ``auto_mapping`` names,
    else the class the base's ``config.json`` names, else as a causal LM" — the mapping first, also where the base
    was saved as another class.
    Kills C23 (the saved architecture taken before ``auto_mapping``)."""
    from transformers import AutoConfig, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from lora_fast import apply_lora, save_adapter

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel(config)
    apply_lora(model, ["c_attn"], rank=2)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg.update(task_type=None, auto_mapping={"base_model_class": "GPT2LMHeadModel",
                                             "parent_library": "transformers.models.gpt2.modeling_gpt2"})
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli_main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "merged").architectures == ["GPT2LMHeadModel"]


def test_merge_into_a_base_too_small_for_the_tokenizer_names_the_recorded_base(tmp_path, capsys):
    """The refusal of a ``--model`` whose embedding table is smaller than the adapter's tokenizer says where to
    merge instead: the base the adapter was trained on, as it records it.
    Kills C31 (the recorded base left out of the message)."""
    from lora_fast.data import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a cat sat on a mat", "the dog ran"] * 5, 300)
    adapter = _classifier_adapter(tmp_path / "a", vocab_size=len(tok))
    tok.save_pretrained(adapter)
    _classifier_adapter(tmp_path / "small", vocab_size=len(tok) - 10)
    assert cli_main(["merge", "--adapter", str(adapter), "--model", str(tmp_path / "small" / "base"), "--output",
                     str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert f"merge into the base the adapter was trained on ({tmp_path / 'a' / 'base'})" in err, err


def test_an_adapter_that_does_not_fit_its_base_is_a_one_line_error(tmp_path, capsys):
    """An adapter whose target modules the base lacks (another architecture's) is refused by ``load_adapter``; the
    CLI prints that as one line, exit status 2, nothing written — not a traceback.
    Kills C32 (``load_adapter``'s ValueError not turned into a ConfigError)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(
        tmp_path / "base")
    cfg = {"base_model_name_or_path": str(tmp_path / "base"), "task_type": "CAUSAL_LM", "peft_type": "LORA",
           "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    adir = _fake_adapter(tmp_path / "adapter", cfg, {"model.layers.0.self_attn.q_proj.lora_A.weight": (2, 16),
                                                      "model.layers.0.self_attn.q_proj.lora_B.weight": (16, 2)})
    assert cli_main(["merge", "--adapter", str(adir), "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("lora-fast merge: error: ") and "q_proj" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_a_merge_interrupted_while_saving_leaves_no_staging_directory(tmp_path, monkeypatch):
    """Ctrl-C while the merged model is written: nothing is written (no output, and no hidden staging directory
    holding a partial model beside it).
    Kills C33 (the staging directory discarded on an Exception only, not on KeyboardInterrupt)."""
    import lora_fast

    class Saving:
        def save_pretrained(self, path):
            (Path(path) / "model.safetensors").write_text("partial")
            raise KeyboardInterrupt

    monkeypatch.setattr(lora_fast, "merge_and_unload", lambda model, **kw: Saving())
    adapter = _classifier_adapter(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".*staging*"))


# ------------------------------------------------------------------------------------------------ run_console
def test_a_stdout_closed_by_its_reader_is_pointed_at_devnull(monkeypatch, tmp_path):
    """``run_console``: after stdout's reader closed the pipe (``lora-fast sweep ... | head -1``) the command ends
    with 141 and stdout's descriptor then goes to /dev/null, so that Python's own flush at exit cannot fail again
    ("Exception ignored ... BrokenPipeError" after the quiet exit).
    Kills C42 (the ``dup2`` onto /dev/null dropped)."""
    import os

    from lora_fast.cli import run_console

    sink = open(tmp_path / "sink", "w")  # noqa: SIM115 (its descriptor stands for stdout's pipe)

    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return sink.fileno()

    monkeypatch.setattr("sys.stdout", Closed())
    assert run_console(cli_main, ["--version"]) == 141
    os.write(sink.fileno(), b"what the exit's flush would write")
    sink.close()
    assert (tmp_path / "sink").read_text() == ""


def test_only_a_rank_of_several_leaves_by_os_exit_and_bad_launcher_variables_are_not_raised_again(monkeypatch):
    """``run_console``: a torchrun rank with WORLD_SIZE > 1 leaves by ``os._exit`` (``leave_rank``); one process —
    no launcher, or ``WORLD_SIZE=1`` — returns its status. Launcher variables that do not parse were reported by the
    command already (its exit status says so): they are not raised again at the end.
    Kills C43 (``world_size >= 1``: every process left by ``os._exit``) and C44 (the ConfigError of bad launcher
    variables raised at the end)."""
    from lora_fast import cli

    left = []
    monkeypatch.setattr(cli.os, "_exit", left.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert cli.run_console(lambda argv: 0) == 0 and not left
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert cli.run_console(lambda argv: 0) == 0 and not left
    monkeypatch.setenv("RANK", "first")
    assert cli.run_console(lambda argv: 2) == 2 and not left
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cli.run_console(lambda argv: 0)
    assert left == [0]


def test_a_leaving_rank_flushes_its_streams_first(monkeypatch):
    """``leave_rank``: "Logging and the streams are flushed first" — ``os._exit`` skips the interpreter's flush, and
    a rank's last lines (the summary on stdout, a warning on stderr) still in a buffer were lost.
    Kills C45 (the flush of stdout and stderr dropped)."""
    from lora_fast import cli

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def write(self, text):
            return len(text)

        def flush(self):
            events.append(f"flush {self.name}")

    monkeypatch.setattr("sys.stdout", Stream("stdout"))
    monkeypatch.setattr("sys.stderr", Stream("stderr"))
    monkeypatch.setattr(cli.os, "_exit", lambda status: events.append(f"exit {status}"))
    cli.leave_rank(3)
    assert events[-1] == "exit 3" and {"flush stdout", "flush stderr"} <= set(events[:-1])


def test_dash_h_is_help(capsys):
    """``lora-fast -h`` is ``--help``: the usage on stdout, exit status 0 (not "unknown command '-h'").
    Kills C48 (only ``--help`` recognised)."""
    assert cli_main(["-h"]) == 0
    assert "usage: lora-fast" in capsys.readouterr().out


def test_merge_refuses_a_non_ascii_model_path_where_the_filesystem_encoding_cannot_hold_it(monkeypatch, capsys):
    """``check_path_encoding`` is given every path a merge opens with tokenizers: ``--model`` too (the base's
    tokenizer is read from it), not only ``--adapter`` and ``--output``.
    Kills C54 (``--model`` not checked)."""
    monkeypatch.setattr("sys.getfilesystemencoding", lambda: "ascii")
    assert cli_main(["merge", "--adapter", "adapter", "--output", "merged", "--model", "modèle"]) == 2
    assert "--model 'modèle': not ASCII" in capsys.readouterr().err


def test_a_merged_output_can_be_overwritten_by_the_next_merge(tmp_path, capsys):
    """README: ``--overwrite`` replaces an earlier output "with the ``.lora-fast-output`` record that ``train``,
    ``sweep`` and ``merge`` write": a merged model is one, so merging again with ``--overwrite`` replaces it.
    Kills C57 (merge's staging without ``command``: no record, and the second merge refused)."""
    adapter = _classifier_adapter(tmp_path)
    argv = ["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]
    assert cli_main(argv) == 0
    assert cli_main([*argv, "--overwrite"]) == 0, capsys.readouterr().err


def test_a_leaving_rank_shuts_logging_down_first(monkeypatch):
    """``leave_rank``: "Logging and the streams are flushed first" — ``logging.shutdown`` flushes and closes the
    handlers (a log file's last records) that ``os._exit`` would drop.
    Kills C60 (``logging.shutdown`` dropped)."""
    import logging

    from lora_fast import cli

    events = []

    class Recording(logging.Handler):
        def emit(self, record):
            pass

        def flush(self):
            events.append("flush")

    handler = Recording()
    logging.getLogger("lora_fast_r7a").addHandler(handler)
    monkeypatch.setattr(cli.os, "_exit", lambda status: events.append("exit"))
    try:
        cli.leave_rank(0)
    finally:
        logging.getLogger("lora_fast_r7a").removeHandler(handler)
    assert events[-1] == "exit" and "flush" in events[:-1]
