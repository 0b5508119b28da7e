"""Unit tests of ``benchmarks/report.py`` on synthetic rows (made up here, never measured): which figure lands in
which column, the ratios' directions, the target verdicts and the layout of the summary, what the report says about
mixed provenance, unknown rows and bad inputs. Plots are drawn only where their content is under test (their
provenance line, their width); elsewhere they are switched off to keep the tests fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import report, utils

GPU = "NVIDIA H100 80GB HBM3"
ENV = {"device": GPU, "torch": "t", "triton": "t", "transformers": "t", "commit": "abc1234",
       "timestamp": "2026-01-01T00:00:00Z"}
LAYER = {"layer": "c_attn", "M": 8192, "K": 768, "N": 2304, "r": 16, "dropout": 0.1, "dtype": "bf16"}  # the targets'
GPT2 = {"model": "gpt2-124M", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257, "batch": 8, "seq": 1024,
        "r": 16, "alpha": 32, "dropout": 0.1, "dtype": "bf16-autocast", "targets": ["c_attn", "c_proj", "c_fc"]}


def layer_row(prov, mode, metric, values, cfg=LAYER, **env):
    return utils.make_row("layer", prov, mode, metric, cfg, values, {**ENV, **env})


def gpt2_row(prov, mode, metric, values, cfg=GPT2, **env):
    return utils.make_row("gpt2", prov, mode, metric, cfg, values, {**ENV, **env})


def cells(lines: list[str], *first: str) -> list[str]:
    """The cells of the one table line whose first cells are ``first``."""
    found = [line for line in lines if line.startswith("| " + " | ".join(first) + " |")]
    assert len(found) == 1, (first, lines)
    return [c.strip() for c in found[0].strip("|").split("|")]


def targets(rows: list[dict], dev: str = GPU) -> list[str]:
    idx = report.index(rows)
    mine = [r for r in rows if r["device"] == dev]
    return report.target_section(dev, idx, [r for r in mine if r["bench"] == "layer"],
                                 [r for r in mine if r["bench"] == "gpt2"])


def verdict(lines: list[str], name_start: str) -> tuple[str, str]:
    """(measured, status) of the target line whose name starts with ``name_start``."""
    found = [line for line in lines if line.startswith("| " + name_start)]
    assert len(found) == 1, (name_start, lines)
    _, measured, status, _ = (c.strip() for c in found[0].strip("|").split("|"))
    return measured, status


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr(report, "plots", lambda *args: [])


def test_layer_table_columns_read_the_right_percentiles_and_ratios():
    """p50 in the time columns, p20–p80 as the full-mode spread, speed-ups as other time / provider time (vs base
    ≤ 1 means overhead, vs peft > 1 means faster than PEFT), peak MB as is and saved bytes in MiB."""
    base, peft, ref = (0.9, 1.0, 1.2), (3.5, 4.0, 4.5), (1.8, 2.5, 2.9)
    rows = [layer_row("base", "full", "time", base), layer_row("peft", "full", "time", peft),
            layer_row("reference", "full", "time", ref), layer_row("reference", "fwd", "time", (0.7, 0.8, 0.95)),
            layer_row("reference", "bwd", "time", (1.1, 1.7, 1.9)), layer_row("reference", "full", "peak_mem", [5.0]),
            layer_row("reference", "fwd", "saved_bytes", [3 * 2**20])]
    lines = report.layer_section(GPU, rows, report.index(rows))
    assert cells(lines, "reference") == ["reference", "0.8", "1.7", "2.5 [1.8–2.9]", f"{1.0 / 2.5:.2f}",
                                         f"{4.0 / 2.5:.2f}", "5", "3"]
    assert cells(lines, "peft")[3:6] == ["4 [3.5–4.5]", f"{1.0 / 4.0:.2f}", "1.00"]
    assert cells(lines, "base")[1:3] == ["–", "–"]  # not measured


def test_gpt2_table_compares_each_provider_with_peft_run_the_same_way():
    """vs peft = provider tokens/s / PEFT tokens/s; a compiled provider (``<name>+compile[:mode]``) is listed and
    compared with PEFT compiled the same way, an eager one with eager PEFT."""
    tps = {"peft": 100.0, "lora_fast": 120.0, "peft+compile": 200.0, "lora_fast+compile": 300.0,
           "peft+compile:reduce-overhead": 400.0, "lora_fast+compile:reduce-overhead": 500.0}
    rows = []
    for prov, t in tps.items():
        ms = 8192 / t * 1e3
        rows += [gpt2_row(prov, "train", "time", (0.9 * ms, ms, 1.2 * ms)), gpt2_row(prov, "train", "tokens_per_s",
                                                                                    [t])]
    lines = report.gpt2_section(GPU, rows, report.index(rows))
    for prov, peer in [("lora_fast", "peft"), ("lora_fast+compile", "peft+compile"),
                       ("lora_fast+compile:reduce-overhead", "peft+compile:reduce-overhead"), ("peft", "peft")]:
        got = cells(lines, prov, "train")
        ms = 8192 / tps[prov] * 1e3
        assert got[2] == f"{ms:.4g} [{0.9 * ms:.4g}–{1.2 * ms:.4g}]", prov
        assert got[3:5] == [f"{tps[prov]:.4g}", f"{tps[prov] / tps[peer]:.2f}"], prov


def test_targets_are_met_at_exactly_the_target():
    """≤ 1.1 and ≥ 1.5 / 1.25 include the bound; the memory target (< 1) does not. (Times chosen so that each ratio
    is exactly its target in floating point: c_attn for the base ratio, c_fc for PEFT's.)"""
    t = report.TARGETS
    c_fc = {**LAYER, "layer": "c_fc", "N": 3072}
    rows = [layer_row("base", "full", "time", [1.0]), layer_row("lora_fast", "full", "time", [t["vs_base"]]),
            layer_row("lora_fast", "full", "time", [2.0], c_fc), layer_row("peft", "full", "time", [2.0 * t["vs_peft"]],
                                                                           c_fc),
            gpt2_row("peft", "train", "tokens_per_s", [100.0]),
            gpt2_row("lora_fast", "train", "tokens_per_s", [100.0 * t["gpt2_tokens"]]),
            gpt2_row("peft", "train", "peak_mem", [900.0]), gpt2_row("lora_fast", "train", "peak_mem", [900.0])]
    lines = targets(rows)
    assert verdict(lines, "c_attn: lora_fast / base") == (f"{t['vs_base']:.3f}", "met")
    assert verdict(lines, "c_fc: peft / lora_fast") == (f"{t['vs_peft']:.3f}", "met")
    assert verdict(lines, "GPT-2 train: lora_fast / peft tokens/s") == (f"{t['gpt2_tokens']:.3f}", "met")
    assert verdict(lines, "GPT-2 train: lora_fast / peft peak memory") == ("1.000", "not met")

    slower = [r for r in rows if r["provider"] != "lora_fast"] + [
        layer_row("lora_fast", "full", "time", [t["vs_base"] + 0.01]),
        layer_row("lora_fast", "full", "time", [2.01], c_fc),
        gpt2_row("lora_fast", "train", "tokens_per_s", [100.0 * t["gpt2_tokens"] - 1]),
        gpt2_row("lora_fast", "train", "peak_mem", [899.0])]
    lines = targets(slower)
    assert verdict(lines, "c_attn: lora_fast / base")[1] == "not met"
    assert verdict(lines, "c_fc: peft / lora_fast")[1] == "not met"
    assert verdict(lines, "GPT-2 train: lora_fast / peft tokens/s")[1] == "not met"
    assert verdict(lines, "GPT-2 train: lora_fast / peft peak memory")[1] == "met"


def test_target_verdict_agrees_with_the_figure_shown():
    """peft 1.65 ms / lora_fast 1.1 ms is 1.4999999999999998 in floating point, printed 1.500: the line must not
    say "not met" beside a figure that meets the ≥ 1.5 target."""
    assert 1.65 / 1.1 < 1.5  # the premise
    rows = [layer_row("base", "full", "time", [1.0]), layer_row("lora_fast", "full", "time", [1.1]),
            layer_row("peft", "full", "time", [1.65])]
    assert verdict(targets(rows), "c_attn: peft / lora_fast") == ("1.500", "met")


def test_only_the_target_configuration_is_judged():
    """Each key of the target configuration (M, r, dropout, dtype) off by one step: no target line for it."""
    off = [{**LAYER, "layer": "c_fc", "N": 3072, k: v} for k, v in
           [("M", 2048), ("r", 8), ("dropout", 0.0), ("dtype", "fp32")]]
    rows = [layer_row(prov, "full", "time", [ms], cfg) for cfg in [LAYER, *off]
            for prov, ms in [("base", 1.0), ("peft", 2.0), ("lora_fast", 1.05)]]
    # GPT-2: only 124M at batch 8 × 1024, r=16, dropout 0.1, eager, without checkpointing is the target's run
    gpt2_off = [{**GPT2, k: v} for k, v in [("model", "gpt2-tiny"), ("batch", 4), ("seq", 512), ("r", 8),
                                            ("dropout", 0.0), ("checkpointing", "non-reentrant"),
                                            ("compile_backend", "aot_eager"), ("alpha", 16), ("targets", ["c_attn"]),
                                            ("n_head", 6)]]
    rows += [gpt2_row(prov, "train", metric, [100.0], cfg) for cfg in [GPT2, *gpt2_off]
             for prov in ("peft", "lora_fast") for metric in ("tokens_per_s", "peak_mem")]
    lines = targets(rows)
    judged = [line for line in lines if line.startswith("| ") and not line.startswith("| target")]
    assert len(judged) == 4, judged
    assert all(line.startswith("| c_attn:") for line in judged[:2]), judged
    assert all(line.startswith("| GPT-2 train:") for line in judged[2:]), judged


def test_gpt2_configs_differing_in_a_key_off_the_title_get_titles_that_say_so():
    """The gpt2 and gpt2-ckpt stages write configs that differ only in ``checkpointing``: their two tables had the
    same title. Every key the title does not show is appended to it."""
    rows = [gpt2_row(prov, "train", "time", [10.0], cfg) for prov in ("peft", "lora_fast")
            for cfg in (GPT2, {**GPT2, "checkpointing": "non-reentrant"}, {**GPT2, "compile_backend": "aot_eager"},
                        {**GPT2, "targets": ["c_attn"]})]
    titles = [line for line in report.gpt2_section(GPU, rows, report.index(rows)) if line.startswith("**")]
    assert len(titles) == len(set(titles)) == 4, titles
    assert sum("checkpointing=non-reentrant" in t for t in titles) == 1
    assert sum("compile_backend=aot_eager" in t for t in titles) == 1
    assert sum("targets=['c_attn']" in t for t in titles) == 1  # a key every config has: named where they differ
    one = [gpt2_row("peft", "train", "time", [10.0])]
    assert "targets" not in next(t for t in report.gpt2_section(GPU, one, report.index(one)) if t.startswith("**"))


def test_provenance_spans_the_earliest_to_the_latest_timestamp():
    stamps = ["2026-03-02T10:00:00Z", "2026-03-05T08:00:00Z", "2026-01-20T23:59:59Z"]  # not in time order
    rows = [layer_row(prov, "full", "time", [1.0], timestamp=ts) for prov, ts in zip(["base", "peft", "reference"],
                                                                                      stamps, strict=True)]
    assert report.provenance(rows).endswith(f"measured {min(stamps)} … {max(stamps)}")


def test_summary_lists_gpus_in_name_order_then_cpu_and_judges_targets_on_gpus_only(tmp_path, no_plots):
    """CPU rows at the target configuration get no target table: the targets are GPU claims."""
    devices = ["cpu", "tesla-like gpu (lower case)", GPU, "AMD Instinct MI300X"]
    rows = []
    for dev in devices:
        rows += [layer_row(prov, "full", "time", [ms], device=dev) for prov, ms in [("base", 1.0), ("peft", 2.0),
                                                                                    ("lora_fast", 1.05)]]
        rows += [gpt2_row(prov, "train", "tokens_per_s", [t], device=dev) for prov, t in [("peft", 1.0),
                                                                                         ("lora_fast", 2.0)]]
    path = tmp_path / "results.csv"
    utils.upsert_csv(path, rows)
    text = report.render(path, tmp_path).read_text(encoding="utf-8")
    sections = text.split("\n## Device: ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == [*sorted(d for d in devices if d != "cpu"), "cpu"]
    for s in sections:
        assert ("### Targets" in s) == (not s.startswith("cpu\n")), s[:40]


# --------------------------------------------------------------------------------------------------------------------
# Provenance: commit and library versions
# --------------------------------------------------------------------------------------------------------------------
def mixed_note(lines: list[str]) -> dict[str, set[str]]:
    """{label: providers} of the one "Measured at more than one …" note in ``lines``; {} when there is none."""
    notes = [line for line in lines if line.startswith("*Measured at more than one")]
    if not notes:
        return {}
    assert len(notes) == 1, notes
    parts = notes[0].split(": ", 1)[1].split(". ")[0].split("; ")
    return {label: set(provs.split(", ")) for provs, label in (p.split(" at ", 1) for p in parts)}


@pytest.mark.parametrize("col", ["torch", "triton", "transformers"])
def test_a_table_mixing_library_versions_at_one_commit_says_which(col):
    """base and peft measured under one version of a library, lora_fast re-measured under another, all at one
    commit: the table says so, names the library, and puts each provider beside its version."""
    rows = [layer_row("base", "full", "time", [1.0], **{col: "2.11"}),
            layer_row("peft", "full", "time", [2.0], **{col: "2.11"}),
            layer_row("lora_fast", "full", "time", [1.05], **{col: "2.12"})]
    lines = report.layer_section(GPU, rows, report.index(rows))
    note = next(line for line in lines if line.startswith("*Measured at more than one"))
    assert col in note.split(":")[0] and "commit" not in note.split(":")[0], note  # names what differs, only that
    assert mixed_note(lines) == {f"{col} 2.11": {"base", "peft"}, f"{col} 2.12": {"lora_fast"}}
    same = [{**r, col: "2.11"} for r in rows]
    assert mixed_note(report.layer_section(GPU, same, report.index(same))) == {}


def test_a_target_from_rows_of_different_library_versions_is_marked_and_shows_both():
    rows = [layer_row("base", "full", "time", [1.0]), layer_row("peft", "full", "time", [2.0]),
            layer_row("lora_fast", "full", "time", [1.05], torch="2.12")]
    lines = targets(rows)
    _, status = verdict(lines, "c_attn: lora_fast / base")
    assert status.startswith("met (across") and "torch" in status and "commit" not in status, status
    row = next(line for line in lines if line.startswith("| c_attn: lora_fast / base"))
    assert "2.12" in row.split("|")[-2] and ENV["torch"] in row.split("|")[-2], row
    same = [{**r, "torch": "2.12"} for r in rows]
    assert verdict(targets(same), "c_attn: lora_fast / base")[1] == "met"  # nothing mixed: no mark


# --------------------------------------------------------------------------------------------------------------------
# Plots (these draw: matplotlib, Agg)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def figures(monkeypatch):
    """The figures ``report.plots`` saves, by file name (still saved as usual). Each gets ``text_boxes``: (text,
    x0, x1, figure width) in pixels of its figure-level titles, texts and legends, taken as it is saved (the report
    closes its figures after saving)."""
    import matplotlib

    matplotlib.use("Agg")
    saved, original = {}, report.save_figure

    def save_figure(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        fig.text_boxes = [(getattr(a, "get_text", lambda: "legend")(), box.x0, box.x1, fig.bbox.width)
                          for a in [fig._suptitle, *fig.texts, *fig.legends]
                          if a is not None and (box := a.get_window_extent(renderer))]
        saved[Path(path).name] = fig
        return original(fig, path)

    monkeypatch.setattr(report, "save_figure", save_figure)
    return saved


def figure_text(fig) -> str:
    return "\n".join([fig.get_suptitle(), *(t.get_text() for t in fig.texts),
                      *(ax.get_title() for ax in fig.axes)])


def plot_rows(commits=("abc1234",), torches=("2.11",)) -> list[dict]:
    """c_attn only (``bench_layer --layers c_attn``), two M, each provider at its own commit / torch in turn."""
    rows = []
    for i, prov in enumerate(("base", "peft", "lora_fast")):
        env = {"commit": commits[i % len(commits)], "torch": torches[i % len(torches)], "triton": "3.6.0",
               "transformers": "5.23.0"}
        for m in (2048, 8192):
            rows += [layer_row(prov, "full", "time", [m / 8192 * (i + 1)], {**LAYER, "M": m}, **env),
                     layer_row(prov, "fwd", "saved_bytes", [2**20 * (i + 1)], {**LAYER, "M": m}, **env)]
    return rows


def test_each_plot_names_its_commit_and_versions_and_says_when_they_are_mixed(tmp_path, figures):
    rows = plot_rows()
    report.plots(GPU, rows, report.index(rows), tmp_path)
    assert len(figures) == 2
    for name, fig in figures.items():
        text = figure_text(fig)
        assert all(v in text for v in ("abc1234", "2.11", "3.6.0", "5.23.0")), (name, text)
        assert "mixed" not in text, (name, text)

    figures.clear()
    rows = plot_rows(commits=("aaaaaaa", "bbbbbbb"), torches=("2.11", "2.12"))
    report.plots(GPU, rows, report.index(rows), tmp_path)
    for name, fig in figures.items():
        text = figure_text(fig)
        assert "mixed" in text and all(v in text for v in ("aaaaaaa", "bbbbbbb", "2.11", "2.12")), (name, text)


def test_a_one_layer_plot_is_wide_enough_for_its_title_and_legend(tmp_path, figures):
    """With one panel the figure used to be narrower than the title, which lost the device name at both ends."""
    rows = plot_rows()
    report.plots(GPU, rows, report.index(rows), tmp_path)
    assert len(figures) == 2
    for name, fig in figures.items():
        assert GPU in fig.get_suptitle()
        for text, x0, x1, width in fig.text_boxes:
            assert 0 <= x0 and x1 <= width, (name, text, x0, x1, width)


def test_a_failed_render_keeps_the_previous_plots_and_summary(tmp_path, monkeypatch):
    """PNGs and SUMMARY.md are written atomically: a render that fails while saving (a full disk) leaves the files
    of the previous render whole, where savefig straight into the file left a truncated PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    csv_path = tmp_path / "results.csv"
    utils.upsert_csv(csv_path, plot_rows())
    report.render(csv_path, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert len([n for n in before if n.endswith(".png")]) == 2 and "SUMMARY.md" in before
    original = Figure.savefig

    def savefig_then_disk_full(self, fname, *args, **kwargs):
        original(self, fname, *args, **kwargs)
        if hasattr(fname, "truncate"):  # what a full disk leaves: the first bytes
            fname.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig_then_disk_full)
    utils.upsert_csv(csv_path, [layer_row("base", "full", "time", [9.0], {**LAYER, "M": 4096})])
    with pytest.raises(OSError, match="No space left"):
        report.render(csv_path, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_plots_draw_a_layer_the_benchmark_does_not_list(tmp_path, figures):
    """A layer name outside ``bench_layer.LAYERS`` (renamed, or an older CSV) gets a panel instead of an empty
    figure (matplotlib refuses zero panels)."""
    rows = [{**r, "config": r["config"].replace('"c_attn"', '"q_proj"')} for r in plot_rows()]
    report.plots(GPU, rows, report.index(rows), tmp_path)
    assert [ax.get_title() for ax in figures[f"layer_time_{report.slug(GPU)}_bf16.png"].axes] == ["q_proj"]


def test_every_provider_has_its_own_colour():
    """Colours were ``C<index>``: with more than ten providers ``C10`` repeated ``C0`` (lora_fast_tma drawn as
    base)."""
    colours = [report.provider_color(p) for p in report.PROVIDERS]
    assert len(report.PROVIDERS) > 10 and len(set(colours)) == len(colours)


def test_a_layer_not_measured_at_the_largest_m_gets_no_zero_bar(tmp_path, figures):
    """c_fc measured at M=2048 only (a stage cut short): its saved-activation bars at M=8192 were drawn as 0 MB,
    the look of a provider that saves nothing. Now no bar, a "not measured" label, and the ticks centred."""
    c_fc = {**LAYER, "layer": "c_fc", "N": 3072, "M": 2048}
    rows = plot_rows() + [layer_row(prov, "fwd", "saved_bytes", [2**20], c_fc) for prov in ("base", "peft")]
    report.plots(GPU, rows, report.index(rows), tmp_path)
    ax = figures[f"layer_saved_{report.slug(GPU)}_bf16.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c_attn", "c_fc"]
    bars = ax.patches
    assert len(bars) == 3 and all(b.get_height() > 0 for b in bars)  # c_attn's three providers only
    assert [t.get_text() for t in ax.texts] == ["not measured"] * 3
    centre = sum(b.get_x() + b.get_width() / 2 for b in bars) / 3
    assert ax.get_xticks()[0] == pytest.approx(centre)


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------------
def run_main(capsys, csv_path, out) -> tuple[int, list[str]]:
    rc = report.main(["--csv", str(csv_path), "--out", str(out)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_main_says_in_one_line_that_the_csv_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "resutls.csv"
    rc, err = run_main(capsys, missing, tmp_path / "out")
    assert rc != 0 and len(err) == 1 and str(missing) in err[0] and "does not exist" in err[0], err
    assert not (tmp_path / "out").exists()


def test_main_says_in_one_line_that_the_csv_has_no_rows(tmp_path, capsys):
    path = tmp_path / "results.csv"
    path.write_text(",".join(utils.CSV_COLUMNS) + "\n", encoding="utf-8")  # header only
    rc, err = run_main(capsys, path, tmp_path / "out")
    assert rc != 0 and len(err) == 1 and str(path) in err[0] and "no rows" in err[0], err
    assert "does not exist" not in err[0]


def test_main_says_in_one_line_that_the_csv_has_other_columns_and_leaves_it(tmp_path, capsys):
    """A CSV that is not the benchmarks' (another tool's, a hand-made table): one line naming the file and that it
    is left untouched (report only reads; the message once said it refused to overwrite the file)."""
    path = tmp_path / "results.csv"
    path.write_text("name,value\nx,1\n", encoding="utf-8")
    rc, err = run_main(capsys, path, tmp_path / "out")
    assert rc != 0 and len(err) == 1 and str(path) in err[0] and "left untouched" in err[0], err
    assert "overwrite" not in err[0] and path.read_text(encoding="utf-8") == "name,value\nx,1\n"
    assert not (tmp_path / "out").exists()


def bad_csv(tmp_path, bad: dict, **change) -> tuple[Path, int]:
    """A CSV of good rows and ``bad`` changed by ``change``; returns its path and the bad row's line."""
    good = [layer_row("base", "full", "time", [1.0]), layer_row("peft", "full", "time", [2.0]),
            gpt2_row("peft", "train", "tokens_per_s", [100.0])]
    path = tmp_path / "results.csv"
    utils.upsert_csv(path, [*good, {**bad, **change}])  # upsert checks the columns only, as a hand edit would pass
    line = 2 + [r["provider"] for r in utils.read_csv(path)].index(bad["provider"])
    return path, line


@pytest.mark.parametrize("col", ["p20", "p50", "p80"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "", "fast"])
def test_a_non_finite_figure_is_refused_naming_its_line(tmp_path, capsys, no_plots, col, value):
    path, line = bad_csv(tmp_path, layer_row("lora_fast", "full", "time", [1.05]), **{col: value})
    rc, err = run_main(capsys, path, tmp_path / "out")
    assert rc != 0 and len(err) == 1, err
    assert f"line {line} " in err[0] and "lora_fast" in err[0] and col in err[0], err
    assert not (tmp_path / "out" / "SUMMARY.md").exists()


@pytest.mark.parametrize(("bench", "key"), [*(("layer", k) for k in LAYER),
                                             *(("gpt2", k) for k in GPT2 if k not in report.GPT2_USUAL_KEYS)])
def test_a_config_missing_a_key_the_report_reads_is_refused_naming_its_line(tmp_path, capsys, no_plots, bench, key):
    make, cfg = (layer_row, LAYER) if bench == "layer" else (gpt2_row, GPT2)
    path, line = bad_csv(tmp_path, make("lora_fast", "full" if bench == "layer" else "train", "time", [1.0],
                                        {k: v for k, v in cfg.items() if k != key}))
    rc, err = run_main(capsys, path, tmp_path / "out")
    assert rc != 0 and len(err) == 1, err
    assert f"line {line} " in err[0] and key in err[0].rsplit(":", 1)[1], err


# --------------------------------------------------------------------------------------------------------------------
# Rows the report does not show; targets on other GPUs
# --------------------------------------------------------------------------------------------------------------------
def test_summary_names_the_providers_and_modes_it_does_not_show(tmp_path, no_plots):
    known = [layer_row("base", "full", "time", [1.0]), layer_row("lora_fast", "full", "time", [1.05]),
             gpt2_row("peft", "train", "tokens_per_s", [100.0]), gpt2_row("peft+compile", "train", "time", [9.0])]
    unknown = [layer_row("lora_fast_v2", "full", "time", [1.1]), layer_row("lora_fast_v2", "fwd", "time", [0.5]),
               layer_row("base", "warmup", "time", [3.0]), gpt2_row("peft_v0", "train", "time", [9.0]),
               gpt2_row("peft", "generate", "time", [9.0])]
    path = tmp_path / "results.csv"
    utils.upsert_csv(path, known + unknown)
    lines = report.render(path, tmp_path).read_text(encoding="utf-8").splitlines()
    flagged = [line for line in lines if "lora_fast_v2" in line]
    assert len(flagged) == 1, flagged  # one line, and no table shows it
    for name in ("lora_fast_v2", "warmup", "peft_v0", "generate"):
        assert name in flagged[0], (name, flagged)
    for name in ("`base`", "`lora_fast`", "`peft`", "`peft+compile`", "`full`", "`train`"):
        assert name not in flagged[0], (name, flagged)
    assert report.not_shown(known) == []


@pytest.mark.parametrize(("dev", "h100"), [(GPU, True), ("NVIDIA H100 PCIe", True), ("NVIDIA H100 NVL", True),
                                           ("NVIDIA A100-SXM4-80GB", False), ("NVIDIA H200", False),
                                           ("AMD Instinct MI300X", False)])
def test_the_h100_targets_are_judged_on_an_h100_only(dev, h100):
    """On another GPU the ratios are still shown (for reference) but never called met or not met."""
    rows = [layer_row(prov, "full", "time", [ms], device=dev) for prov, ms in [("base", 1.0), ("peft", 2.0),
                                                                                ("lora_fast", 1.3)]]
    lines = targets(rows, dev)
    for name, shown in [("c_attn: lora_fast / base", "1.300"), ("c_attn: peft / lora_fast", "1.538")]:
        measured, status = verdict(lines, name)
        assert measured == shown
        assert (status in ("met", "not met")) == h100, (dev, status)
        assert ("met" in status.split()) == h100, (dev, status)  # no "met"/"not met" wording at all elsewhere
    assert any("not an H100" in line for line in lines) != h100, lines
