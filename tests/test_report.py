"""Unit tests of ``benchmarks/report.py`` on synthetic rows (made up here, never measured): which figure lands in
which column, the ratios' directions, the target verdicts and the layout of the summary. Plots are left to the
smoke test (``tests/test_benchmarks_smoke.py``); here they are switched off to keep the tests fast."""

from __future__ import annotations

import pytest

from benchmarks import report, utils

GPU = "NVIDIA H100 80GB HBM3"
ENV = {"device": GPU, "torch": "t", "triton": "t", "transformers": "t", "commit": "abc1234",
       "timestamp": "2026-01-01T00:00:00Z"}
LAYER = {"layer": "c_attn", "M": 8192, "K": 768, "N": 2304, "r": 16, "dropout": 0.1, "dtype": "bf16"}  # the targets'
GPT2 = {"model": "gpt2-124M", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257, "batch": 8, "seq": 1024,
        "r": 16, "alpha": 32, "dropout": 0.1, "dtype": "bf16-autocast"}


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
    rows += [gpt2_row(prov, "train", "tokens_per_s", [100.0], {**GPT2, "model": "gpt2-tiny"})
             for prov in ("peft", "lora_fast")]
    lines = targets(rows)
    judged = [line for line in lines if line.startswith("| ") and not line.startswith("| target")]
    assert len(judged) == 2 and all(line.startswith("| c_attn:") for line in judged), judged


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
