"""Mutation-testing round 8 (``benchmarks/report.py``, ``benchmarks/utils.py``): properties of the benchmark report
and its CSV machinery that no other test pinned. Synthetic rows made up here, never measured figures; plots are
switched off except where their content is under test. Each test names the mutants it kills."""

from __future__ import annotations

import pytest

from benchmarks import report, utils
from tests.test_report import GPT2, GPU, LAYER, cells, gpt2_row, layer_row, targets, verdict


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr(report, "plots", lambda *args: [])


def test_a_ratio_over_a_zero_figure_is_not_measured_rather_than_an_error():
    """A zero denominator (a hand-edited row, a peak of 0 MB) gives no ratio — ``–`` in its column — instead of a
    ZeroDivisionError that ends the report. Kills R02 (``den is not None`` in ``ratio``)."""
    assert report.ratio(1.0, 0.0) is None
    rows = [layer_row("base", "full", "time", [0.0]), layer_row("peft", "full", "time", [0.0]),
            layer_row("reference", "full", "time", [2.0])]
    assert cells(report.layer_section(GPU, rows, report.index(rows)), "reference")[4:6] == ["0.00", "0.00"]
    rows = [layer_row("base", "full", "time", [1.0]), layer_row("reference", "full", "time", [0.0])]
    assert cells(report.layer_section(GPU, rows, report.index(rows)), "reference")[4] == "–"


def test_the_device_provenance_line_names_all_four_columns():
    """Provenance is (commit, torch, triton, transformers) (module docstring): the line under each device heading
    names the value of each. Kills R04 (the transformers/peft version left out)."""
    rows = [layer_row("base", "full", "time", [1.0], commit="c0ffee1", torch="2.11", triton="3.6.0",
                      transformers="5.23.0 (peft 0.21.0)")]
    line = report.provenance(rows)
    for col, value in [("commit", "c0ffee1"), ("torch", "2.11"), ("triton", "3.6.0"),
                       ("transformers", "5.23.0 (peft 0.21.0)")]:
        assert f"{col} {value}" in line, (col, line)


def test_a_table_mixing_a_commit_and_a_library_version_names_both():
    """lora_fast re-measured at another commit under another torch: the note names both things that differ
    ("commit and torch version"), and each provider beside its commit and version. Kills R07 (``and_join``
    naming only the first)."""
    rows = [layer_row("base", "full", "time", [1.0]), layer_row("peft", "full", "time", [2.0]),
            layer_row("lora_fast", "full", "time", [1.05], commit="bbbbbbb", torch="2.12")]
    notes = [line for line in report.layer_section(GPU, rows, report.index(rows))
             if line.startswith("*Measured at more than one")]
    assert len(notes) == 1, notes
    assert notes[0].startswith("*Measured at more than one commit and torch version: "), notes[0]
    assert "lora_fast at bbbbbbb, torch 2.12" in notes[0], notes[0]
    assert report.and_join(["a", "b", "c"]) == "a, b and c"


def test_a_device_named_h100_in_any_case_is_judged():
    """Targets are judged "on a device whose name says H100" (``is_h100``), whatever its case. Kills R12."""
    assert report.is_h100("nvidia h100 80gb hbm3") and report.is_h100(GPU)
    assert not report.is_h100("NVIDIA H200")


def test_rows_of_a_bench_the_report_does_not_know_are_named_not_checked(tmp_path, no_plots):
    """Rows of an unknown bench are not read and not checked (``check_rows``): their config need not have any key
    the tables read; the summary renders and names them in its "Not shown" line. Kills R14 (every row checked
    against ``CONFIG_KEYS``: a KeyError ended the report)."""
    other = {**layer_row("base", "full", "time", [1.0]), "bench": "attention", "config": '{"heads":12}'}
    path = tmp_path / "results.csv"
    utils.upsert_csv(path, [layer_row("base", "full", "time", [1.0]), other])
    text = report.render(path, tmp_path).read_text(encoding="utf-8")
    assert "*Not shown (the report does not know them): bench `attention` (1 row).*" in text


@pytest.mark.parametrize("config", ["5", "[]", '"layer M K N r dropout dtype"', "null"])
def test_a_config_that_is_not_a_json_object_is_refused_as_such(tmp_path, capsys, no_plots, config):
    """``check_rows``: a config that is not a JSON object is refused in one line naming its line and saying so
    (exit 2), never read as a list of keys or a string to search. Kills R18 (``cfg is None`` the only check)."""
    path = tmp_path / "results.csv"
    utils.upsert_csv(path, [layer_row("base", "full", "time", [1.0]),
                            {**layer_row("peft", "full", "time", [2.0]), "config": config}])
    line = 2 + [r["provider"] for r in utils.read_csv(path)].index("peft")
    assert report.main(["--csv", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"line {line} " in err[0] and "is not a JSON object" in err[0], err


def test_layer_tables_follow_the_benchmarks_layer_order_then_m_ascending():
    """Tables in the order the benchmark lists its layers (``bench_layer.LAYERS``: the GPT-2 block's order, not the
    alphabet), each layer's shapes by M as numbers (256 before 1024). Kills R25 (M compared as text) and R26
    (layers by name)."""
    shapes = {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072)}
    rows = [layer_row("base", "full", "time", [1.0], {**LAYER, "layer": n, "K": k, "N": n_out, "M": m})
            for n, (k, n_out) in reversed(shapes.items()) for m in (8192, 256, 1024)]
    titles = [line.split()[:2] for line in report.layer_section(GPU, rows, report.index(rows))
              if line.startswith("**")]
    want = [n for n in report.LAYERS if n in shapes]
    assert want == ["c_attn", "attn.c_proj", "c_fc"]  # the premise: not alphabetical
    assert titles == [[f"**{n}**", f"M={m}"] for n in want for m in (256, 1024, 8192)], titles


def test_a_layer_table_lists_only_the_providers_measured_at_its_shape_on_its_device():
    """A provider gets a row where it was measured at that shape on that device: not every known provider as a
    row of dashes, not one measured on another GPU. Kills R30 (no provider filter) and R31 (no device filter)."""
    rows = [layer_row("base", "full", "time", [1.0]), layer_row("peft", "fwd", "time", [2.0]),
            layer_row("lora_fast", "full", "time", [1.05], device="NVIDIA A100-SXM4-80GB")]
    lines = report.layer_section(GPU, [r for r in rows if r["device"] == GPU], report.index(rows))
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ")][1:] == ["base", "peft"], lines


def test_each_gpt2_row_shows_the_peak_memory_of_its_own_mode():
    """The gpt2 table has a row per provider and mode: its peak MB is that mode's (training holds activations and
    gradients, inference does not). Kills R43 (every mode's row showing the train peak)."""
    rows = []
    for mode, peak in [("train", 900.0), ("infer_unmerged", 300.0), ("infer_merged", 250.0)]:
        rows += [gpt2_row("peft", mode, "time", [10.0]), gpt2_row("peft", mode, "peak_mem", [peak])]
    lines = report.gpt2_section(GPU, rows, report.index(rows))
    assert [cells(lines, "peft", mode)[5] for mode in report.GPT2_MODES] == ["900", "300", "250"]


def test_a_gpt2_table_measured_at_one_commit_is_not_called_mixed_for_another_tables_commit():
    """The mixed-provenance note is per table: two GPT-2 configurations, each measured whole at its own commit,
    get no note; a table whose providers differ gets one, naming only its own. Kills R46 (the note computed over
    every GPT-2 row of the device)."""
    ckpt = {**GPT2, "checkpointing": "non-reentrant"}
    rows = [gpt2_row(prov, "train", "time", [10.0], cfg, commit=commit) for cfg, commit in
            [(GPT2, "aaaaaaa"), (ckpt, "bbbbbbb")] for prov in ("peft", "lora_fast")]
    lines = report.gpt2_section(GPU, rows, report.index(rows))
    assert not [line for line in lines if line.startswith("*Measured at more than one")], lines
    rows.append(gpt2_row("reference", "train", "time", [12.0], ckpt, commit="ccccccc"))
    notes = [line for line in report.gpt2_section(GPU, rows, report.index(rows))
             if line.startswith("*Measured at more than one")]
    assert notes == ["*Measured at more than one commit: lora_fast, peft at bbbbbbb; reference at ccccccc. Ratios "
                     "across them compare different runs.*"], notes


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures ``report.plots`` saves, by file name (saved as usual)."""
    import matplotlib

    matplotlib.use("Agg")
    saved, original = {}, report.save_figure

    def save_figure(fig, path):
        saved[path.name] = fig
        return original(fig, path)

    monkeypatch.setattr(report, "save_figure", save_figure)
    return saved


def test_the_time_plot_draws_r16_dropout_01_where_measured_and_only_those_rows(tmp_path, saved_figures):
    """The time plot is of r=16 and dropout 0.1 where measured (module docstring), even when another combination
    sorts first, and draws only that combination's points (one per M), each at its p50 with a bar from its p20 to
    its p80 (the spread is not symmetric). Kills R67 (the first combination taken), R68 (every combination's rows
    drawn) and R71 (the bar below p50 as long as the one above)."""
    rows = [layer_row("base", "full", "time", [0.5 * ms * m / 8192, ms * m / 8192, 2 * ms * m / 8192],
                      {**LAYER, "M": m, "r": r, "dropout": p})
            for r, p, ms in [(8, 0.0, 5.0), (16, 0.1, 1.0)] for m in (2048, 8192)]
    report.plots(GPU, rows, report.index(rows), tmp_path)
    fig = saved_figures[f"layer_time_{report.slug(GPU)}_bf16.png"]
    assert "r=16 · dropout=0.1" in fig.get_suptitle()
    (drawn,) = fig.axes[0].containers  # one provider, one errorbar
    line = drawn.lines[0]
    assert list(line.get_xdata()) == [2048, 8192] and list(line.get_ydata()) == [0.25, 1.0]
    bars = [[tuple(xy) for xy in seg] for seg in drawn.lines[2][0].get_segments()]
    assert bars == [[(2048, pytest.approx(0.125)), (2048, pytest.approx(0.5))],
                    [(8192, pytest.approx(0.5)), (8192, pytest.approx(2.0))]], bars


def test_a_target_is_judged_on_the_medians():
    """A target ratio is of the two p50 times (the figure every table shows), not of their p20s: here the medians
    give 1.600 (met) where the p20s would give 1.000. Kills R91."""
    rows = [layer_row("base", "full", "time", [1.0, 1.0, 1.0]), layer_row("lora_fast", "full", "time", [1.0, 1.0, 1.2]),
            layer_row("peft", "full", "time", [1.0, 1.6, 1.7])]
    assert verdict(targets(rows), "c_attn: peft / lora_fast") == ("1.600", "met")


@pytest.mark.parametrize("bench, argv, phrase", [
    ("bench_layer", ["--warmup", "-1"], "--warmup >= 0"), ("bench_layer", ["--rep", "0"], "--rep >= 1"),
    ("bench_layer", ["--dropouts", "1.0"], "dropouts in [0, 1)"), ("bench_layer", ["--ranks", "0"], "positive"),
    ("bench_gpt2", ["--seq", "1"], "--seq >= 2"), ("bench_gpt2", ["--batch", "0"], "--batch >= 1"),
    ("bench_gpt2", ["--warmup", "-1"], "--warmup >= 0"),
    ("bench_gpt2", ["--model-path", "{llama}"], "holds a llama model, not GPT-2"),
    ("bench_gpt2", ["--model-path", "{unknown}"], "no model config loads from it"),
])
def test_benchmark_options_out_of_range_are_usage_errors(tmp_path, capsys, bench, argv, phrase):
    """Each bound of the benchmarks' options is refused before anything runs, naming it (exit status 2): warmup
    below 0, rep, batch, rank below 1, seq below 2, dropout 1; a --model-path of another model type or whose config
    transformers cannot read (an unknown model_type: its ValueError). Kills B01, B02, B04, B05, G01, G02, G03, G07,
    G08."""
    import importlib
    import json

    for name, cfg in (("llama", {"model_type": "llama"}), ("unknown", {"model_type": "no-such-model"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    module = importlib.import_module(f"benchmarks.{bench}")
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--quick", *(a.format(llama=tmp_path / "llama", unknown=tmp_path / "unknown")
                                        for a in argv)])
    assert e.value.code == 2 and phrase in capsys.readouterr().err


def test_the_results_csv_is_written_sorted_and_a_failed_write_leaves_the_file_and_no_temporary(tmp_path, monkeypatch):
    """Rows are written sorted by (bench, device, config, provider, mode, metric) whatever order they came in (stable
    diffs, ``_write_csv``'s docstring), and a write that fails midway leaves the old file as it was and no
    temporary file beside it. Kills U37, U41."""
    path = tmp_path / "results.csv"
    rows = [layer_row(p, m, "time", [1.0]) for p in ("peft", "base") for m in ("fwd", "full")]
    utils.upsert_csv(path, rows)
    got = [(r["provider"], r["mode"]) for r in utils.read_csv(path)]
    assert got == sorted(got) == [("base", "full"), ("base", "fwd"), ("peft", "full"), ("peft", "fwd")]
    before = path.read_bytes()

    def fail(self, rows):
        raise OSError("disk full")
    monkeypatch.setattr(utils.csv.DictWriter, "writerows", fail)
    with pytest.raises(OSError, match="disk full"):
        utils.upsert_csv(path, [layer_row("reference", "full", "time", [1.0])])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_bad_report_input_is_exit_status_2(tmp_path, capsys):
    """Bad input to ``benchmarks.report`` (a missing CSV, one without the results columns) is a usage-style error:
    one line on stderr and exit status 2, as argparse's own refusals. Kills R89 (exit status 1)."""
    bad = tmp_path / "other.csv"
    bad.write_text("name,value\n", encoding="utf-8")
    for path in (tmp_path / "missing.csv", bad):
        assert report.main(["--csv", str(path), "--out", str(tmp_path / "out")]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_rows_are_made_only_of_known_benches_and_finite_values_and_written_only_in_the_csv_s_column_order(tmp_path):
    """``make_row`` refuses an unknown bench and a non-finite value (inf as well as nan); ``upsert_csv`` refuses a
    row whose columns come in another order (the CSV's header is fixed). Kills U22, U24, U28."""
    with pytest.raises(ValueError, match="bench must be one of"):
        utils.make_row("layers", "base", "full", "time", LAYER, [1.0], {})
    for value in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            layer_row("base", "full", "time", [1.0, value, 2.0])
    row = layer_row("base", "full", "time", [1.0])
    with pytest.raises(ValueError, match="row columns"):
        utils.upsert_csv(tmp_path / "results.csv", [dict(reversed(row.items()))])
    assert not (tmp_path / "results.csv").exists()
