"""Render the results CSV: ``SUMMARY.md`` (tables, target check) and PNG plots.

    python -m benchmarks.report [--csv benchmarks/results/results.csv] [--out benchmarks/results]

Per device (GPU name or ``cpu``):
    layer   one table per shape: each provider's p50 time in fwd / bwd / full (p20–p80 for full), the full-mode
            speed-ups vs ``base`` (base time / provider time: ≤ 1, the closer to 1 the better) and vs ``peft``
            (peft time / provider time), peak memory (full mode) and saved activations.
    gpt2    one table per model: each provider's step time, tokens/s, speed-up vs ``peft``, peak memory, per mode.
    targets (GPU devices) the issue's H100 targets at bf16, M=8192, r=16, dropout 0.1, forward+backward; each
            ratio is judged as printed (3 decimals), so a figure and its verdict never disagree.
            The targets are H100 targets: on any other device the figures are shown for reference, not judged.
Plots (matplotlib, Agg): ``layer_time_<device>_<dtype>.png`` — p50 time vs M per provider, one panel per layer
(full mode, r=16 and dropout 0.1 where measured); ``layer_saved_<device>_<dtype>.png`` — saved activations per
provider at the largest M. Each figure names the commit(s) and library versions of the rows it draws.

Provenance is (commit, torch, triton, transformers): a table, target or plot whose rows differ in any of them says
which. Rows of a bench, provider or mode the report does not know are named in a line at the top, not dropped
silently. A row with a non-finite figure or a config lacking a key the tables need is refused (``main``: one line,
exit 2), naming its line in the CSV.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import bench_gpt2, utils
from benchmarks.bench_layer import ALL_PROVIDERS as PROVIDERS
from benchmarks.bench_layer import LAYERS
from benchmarks.bench_layer import MODES as LAYER_MODES
from lora_fast.plots import save_png
from lora_fast.train_io import write_atomic

GPT2_PROVIDERS = ("lora_fast", *utils.VARIANT_PROVIDERS, "peft", *utils.PATCHED_PROVIDERS, "reference")
GPT2_MODES = ("train", "infer_unmerged", "infer_merged")
# the config keys each bench's tables, targets and plots read
CONFIG_KEYS = {"layer": ("layer", "M", "K", "N", "r", "dropout", "dtype"),
               "gpt2": ("model", "n_layer", "n_embd", "batch", "seq", "r", "alpha", "dropout", "dtype")}
MODES_OF = {"layer": LAYER_MODES, "gpt2": GPT2_MODES}
PROVENANCE = ("commit", "torch", "triton", "transformers")  # what a figure was measured with, besides the device
VERSION_OF = {"commit": "commit", "torch": "torch version", "triton": "triton version",
              "transformers": "transformers/peft version"}  # the column holds both (utils.env_info)
TARGET_CFG = {"M": 8192, "r": 16, "dropout": 0.1, "dtype": "bf16"}
# the GPT-2 target's run: 124M, batch 8 × 1024 (M = 8192), r=16, dropout 0.1, plain eager (a config with any other
# key — checkpointing, compile_backend — is another experiment, shown in its table but not judged)
GPT2_TARGET_CFG = {**bench_gpt2.FULL_SET, **bench_gpt2.LORA, "dtype": "bf16-autocast", "targets": bench_gpt2.TARGETS}
GPT2_TITLE_KEYS = (*CONFIG_KEYS["gpt2"], "threads")  # what the table title shows
GPT2_USUAL_KEYS = ("n_head", "vocab", "targets")  # in every config: named in a title only where configs differ
TARGETS = {"vs_base": 1.10, "vs_peft": 1.5, "gpt2_tokens": 1.25}  # from issue 4


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def index(rows: list[dict]) -> dict:
    """{(bench, device, config-json, provider, mode, metric): row}."""
    return {(r["bench"], r["device"], r["config"], r["provider"], r["mode"], r["metric"]): r for r in rows}


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def p50(idx, *key) -> float | None:
    row = idx.get(key)
    return float(row["p50"]) if row else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def provenance(rows: list[dict]) -> str:
    parts = []
    for col in ("commit", "torch", "triton", "transformers"):
        parts.append(f"{col} {', '.join(sorted({r[col] for r in rows}))}")
    stamps = sorted(r["timestamp"] for r in rows)
    return "; ".join(parts) + f"; measured {stamps[0]} … {stamps[-1]}"


def differing(rows: list[dict]) -> list[str]:
    """The provenance columns on which ``rows`` disagree. A library upgraded between two runs at one commit changes
    the figures as much as a code change does, so the versions count as much as the commit."""
    return [col for col in PROVENANCE if len({r[col] for r in rows}) > 1]


def and_join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def stamp_label(cols: list[str], values: tuple[str, ...]) -> str:
    """``aaaaaaa, torch 2.11``: a commit bare (as everywhere in the summary), a version after its library's name."""
    return ", ".join(v if c == "commit" else f"{c} {v}" for c, v in zip(cols, values, strict=True))


def mixed_provenance(rows: list[dict]) -> list[str]:
    """A line under a table whose rows come from more than one commit or library version (a rerun replaces only the
    rows it measures, so a table can hold a provider's figures from an earlier run): which providers were measured
    at which commit / under which versions, naming only the columns that differ."""
    cols = differing(rows)
    if not cols:
        return []
    by_stamp = defaultdict(set)
    for r in rows:
        by_stamp[tuple(r[c] for c in cols)].add(r["provider"])
    parts = [f"{', '.join(sorted(provs))} at {stamp_label(cols, st)}" for st, provs in sorted(by_stamp.items())]
    return [f"*Measured at more than one {and_join([VERSION_OF[c] for c in cols])}: {'; '.join(parts)}. Ratios "
            "across them compare different runs.*", ""]


def figure_stamp(rows: list[dict]) -> str:
    """The provenance line a PNG carries (a plot is shown on its own, away from the summary's provenance line):
    ``commit … · torch … · triton … · transformers …``, led by ``mixed:`` when its rows differ in any of them."""
    text = " · ".join(f"{col} {', '.join(sorted({r[col] for r in rows}))}" for col in PROVENANCE)
    return f"mixed: {text}" if differing(rows) else text


def is_h100(dev: str) -> bool:
    """The issue's targets are H100 figures: judged only on a device whose name says H100."""
    return "H100" in dev.upper()


def check_rows(rows: list[dict], source: str | Path) -> None:
    """Refuse a row the report cannot show truthfully, naming its line in the CSV: a p20/p50/p80 that is not a
    finite number, or a config that is not a JSON object with the keys its bench's tables read. The writers never
    write either (``utils.make_row`` refuses them); a hand-edited or merged file can. Refused rather than shown:
    a NaN would print as ``nan`` beside a verdict, and a missing key would end the report in a KeyError. Rows of a
    bench the report does not know are not read, and not checked (``not_shown`` names them)."""
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        if r["bench"] not in CONFIG_KEYS:
            continue
        where = f"{source}, line {line} ({r['bench']} {r['provider']} {r['mode']} {r['metric']} on {r['device']})"
        for col in ("p20", "p50", "p80"):
            try:
                finite = math.isfinite(float(r[col]))
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise ValueError(f"{where}: {col} {r[col]!r} is not a finite number")
        try:
            cfg = json.loads(r["config"])
        except (TypeError, ValueError):
            cfg = None
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: config {r['config']!r} is not a JSON object")
        missing = [k for k in CONFIG_KEYS[r["bench"]] if k not in cfg]
        if missing:
            raise ValueError(f"{where}: config {r['config']} lacks {', '.join(missing)}")


def provider_shown(bench: str, provider: str) -> bool:
    """Whether the tables and plots of ``bench`` show this provider (as their sections select providers)."""
    if bench == "gpt2":
        return provider in GPT2_PROVIDERS or "+compile" in provider  # bench_gpt2 --compile: <name>+compile[:mode]
    return provider in PROVIDERS


def not_shown(rows: list[dict]) -> list[str]:
    """A line naming the benches, providers and modes in the CSV that no table or plot shows (a renamed provider,
    rows of an older or newer benchmark), with their row counts: rows never vanish without a word."""
    counts = defaultdict(int)
    for r in rows:
        bench = r["bench"]
        if bench not in MODES_OF:
            counts[f"bench `{bench}`"] += 1
            continue
        if not provider_shown(bench, r["provider"]):
            counts[f"{bench} provider `{r['provider']}`"] += 1
        if r["mode"] not in MODES_OF[bench]:
            counts[f"{bench} mode `{r['mode']}`"] += 1
    if not counts:
        return []
    parts = [f"{what} ({n} row{'s' * (n != 1)})" for what, n in sorted(counts.items())]
    return [f"*Not shown (the report does not know them): {'; '.join(parts)}.*", ""]


def layer_configs(rows: list[dict]) -> list[tuple[dict, str]]:
    cfgs = {r["config"] for r in rows}
    order = {n: i for i, n in enumerate(LAYERS)}

    def key(c):
        d = json.loads(c)
        return (d["dtype"], d["r"], d["dropout"], order.get(d["layer"], 99), d["M"])

    return [(json.loads(c), c) for c in sorted(cfgs, key=key)]


def layer_section(dev: str, rows: list[dict], idx: dict) -> list[str]:
    out = ["### Layer benchmark", "",
           "Times are p50 ms. *vs base* = base time / provider time in full mode (1.00 = no LoRA overhead); *vs "
           "peft* = PEFT time / provider time (> 1 = faster than PEFT). Peak MB: full mode, above the inputs. Saved: "
           "activations autograd keeps for backward (parameters excluded). `torch_compile` appears only where it was "
           "compiled (the smallest shape in `--quick`; bf16, r=16, dropout 0.1 in the full set); its peak memory is "
           "not measured on a CPU. `–`: not measured.", ""]
    for cfg, c in layer_configs(rows):
        extra = f", CPU threads: {cfg['threads']}" if "threads" in cfg else ""
        out += [f"**{cfg['layer']}** M={cfg['M']} K={cfg['K']} N={cfg['N']} r={cfg['r']} dropout={cfg['dropout']} "
                f"{cfg['dtype']}{extra}", "",
                "| provider | fwd ms | bwd ms | full ms [p20–p80] | vs base | vs peft | peak MB | saved MB |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        base_t = p50(idx, "layer", dev, c, "base", "full", "time")
        peft_t = p50(idx, "layer", dev, c, "peft", "full", "time")
        for prov in PROVIDERS:
            if not any(k[:4] == ("layer", dev, c, prov) for k in idx):
                continue
            full = idx.get(("layer", dev, c, prov, "full", "time"))
            spread = f"{float(full['p50']):.3g} [{float(full['p20']):.3g}–{float(full['p80']):.3g}]" if full else "–"
            t = float(full["p50"]) if full else None
            saved = p50(idx, "layer", dev, c, prov, "fwd", "saved_bytes")
            out.append(f"| {prov} | {fmt(p50(idx, 'layer', dev, c, prov, 'fwd', 'time'))} | "
                       f"{fmt(p50(idx, 'layer', dev, c, prov, 'bwd', 'time'))} | {spread} | "
                       f"{fmt(ratio(base_t, t), '.2f')} | {fmt(ratio(peft_t, t), '.2f')} | "
                       f"{fmt(p50(idx, 'layer', dev, c, prov, 'full', 'peak_mem'), '.3g')} | "
                       f"{fmt(None if saved is None else saved / 2**20, '.3g')} |")
        out.append("")
        out += mixed_provenance([r for r in rows if r["config"] == c])
    return out


def gpt2_section(dev: str, rows: list[dict], idx: dict) -> list[str]:
    out = ["### GPT-2 benchmark", ""]
    configs = [json.loads(c) for c in {r["config"] for r in rows}]
    varying = {k for k in GPT2_USUAL_KEYS if len({json.dumps(cfg.get(k)) for cfg in configs}) > 1}
    for c in sorted({r["config"] for r in rows}):
        cfg = json.loads(c)
        extra = f", CPU threads: {cfg['threads']}" if "threads" in cfg else ""
        extra += "".join(f", {k}={cfg[k]}" for k in sorted(cfg)  # checkpointing, compile_backend, ...
                         if k not in GPT2_TITLE_KEYS and (k not in GPT2_USUAL_KEYS or k in varying))
        out += [f"**{cfg['model']}** ({cfg['n_layer']} layers, {cfg['n_embd']} wide), batch {cfg['batch']} × "
                f"{cfg['seq']}, r={cfg['r']} α={cfg['alpha']} dropout={cfg['dropout']}, {cfg['dtype']}{extra}", "",
                "| provider | mode | ms [p20–p80] | tokens/s | vs peft (compiled alike) | peak MB |",
                "|---|---|---:|---:|---:|---:|"]
        present = {r["provider"] for r in rows if r["config"] == c}
        compiled = sorted(p for p in present if "+compile" in p)  # bench_gpt2 --compile: <name>+compile[:mode]
        for mode in GPT2_MODES:
            for prov in [*GPT2_PROVIDERS, *compiled]:
                t = idx.get(("gpt2", dev, c, prov, mode, "time"))
                if t is None:
                    continue
                # a compiled provider is compared with PEFT compiled the same way (eager with eager)
                peer = "peft" + (prov[prov.index("+compile"):] if "+compile" in prov else "")
                peft_tps = p50(idx, "gpt2", dev, c, peer, mode, "tokens_per_s")
                tps = p50(idx, "gpt2", dev, c, prov, mode, "tokens_per_s")
                out.append(f"| {prov} | {mode} | {float(t['p50']):.4g} [{float(t['p20']):.4g}–{float(t['p80']):.4g}] "
                           f"| {fmt(tps, '.4g')} | {fmt(ratio(tps, peft_tps), '.2f')} | "
                           f"{fmt(p50(idx, 'gpt2', dev, c, prov, mode, 'peak_mem'), '.4g')} |")
        out.append("")
        out += mixed_provenance([r for r in rows if r["config"] == c])
    return out


def target_section(dev: str, idx: dict, layer_rows: list[dict], gpt2_rows: list[dict]) -> list[str]:
    """The issue's targets, checked on this device's rows: met, missed, or no data; with the commits measured (and
    the library versions where the two figures of a ratio differ in them). The targets are H100 figures: on another
    device the ratios are shown for reference, never judged against them."""
    judged = is_h100(dev)
    out = ["### Targets (issue 4: H100, bf16, M=8192, r=16, dropout 0.1, forward+backward)"
           + ("" if judged else " — for reference only, not an H100"), ""]
    if not judged:
        out += [f"*The targets are the issue's H100 targets; {dev} is not an H100, so its ratios are shown for "
                "reference, with no met / not met verdict.*", ""]
    out += ["| target | measured | status | commits |", "|---|---:|---|---|"]

    def line(name, keys, ok):
        num, den = (idx.get(k) for k in keys)
        value = ratio(*(None if row is None else float(row["p50"]) for row in (num, den)))
        shown = fmt(value, ".3f")  # judged as shown: 1.65 / 1.1 = 1.4999999999999998 is printed, and meets, 1.500
        if value is None:
            status = "no data"
        else:
            status = ("met" if ok(float(shown)) else "not met") if judged else "for reference"
        commits = ", ".join(sorted({row["commit"] for row in (num, den) if row is not None})) or "–"
        if value is not None and (cols := differing([num, den])):
            status += f" (across {', '.join(VERSION_OF[c] + 's' for c in cols)})"
            commits = "; ".join([commits, *(f"{c} {', '.join(sorted({num[c], den[c]}))}" for c in cols
                                            if c != "commit")])
        out.append(f"| {name} | {shown} | {status} | {commits} |")

    for cfg, c in layer_configs(layer_rows):
        if any(cfg.get(k) != v for k, v in TARGET_CFG.items()):
            continue
        lf, base, peft = (("layer", dev, c, prov, "full", "time") for prov in ("lora_fast", "base", "peft"))
        line(f"{cfg['layer']}: lora_fast / base time ≤ {TARGETS['vs_base']}", (lf, base),
             lambda v: v <= TARGETS["vs_base"])
        line(f"{cfg['layer']}: peft / lora_fast time ≥ {TARGETS['vs_peft']}", (peft, lf),
             lambda v: v >= TARGETS["vs_peft"])
    for c in sorted({r["config"] for r in gpt2_rows}):
        cfg = json.loads(c)
        if any(cfg.get(k) != v for k, v in GPT2_TARGET_CFG.items()) or set(cfg) - {*GPT2_TARGET_CFG, "threads"}:
            continue
        lf, peft = (("gpt2", dev, c, prov, "train") for prov in ("lora_fast", "peft"))
        line(f"GPT-2 train: lora_fast / peft tokens/s ≥ {TARGETS['gpt2_tokens']}",
             (lf + ("tokens_per_s",), peft + ("tokens_per_s",)), lambda v: v >= TARGETS["gpt2_tokens"])
        line("GPT-2 train: lora_fast / peft peak memory < 1", (lf + ("peak_mem",), peft + ("peak_mem",)),
             lambda v: v < 1.0)
    return out + [""]


def provider_color(prov: str):
    """One colour per provider, the same in every plot: tab20's ten dark hues, then its light ones (matplotlib's
    ``C0``–``C9`` cycle has ten, and there are more providers: ``C10`` is ``C0`` again)."""
    import matplotlib

    i = PROVIDERS.index(prov)
    return matplotlib.colormaps["tab20"]((2 * i) % 20 + (i // 10) % 2)


def fit_width(fig, texts) -> None:
    """Widen ``fig`` until each of ``texts`` (figure-level titles, the legend) fits across it: one panel is 4.2 in
    wide, narrower than a GPU's name in the title, and the title would be cut at both ends."""
    renderer = fig.canvas.get_renderer()
    need = max(t.get_window_extent(renderer).width for t in texts) / fig.dpi + 0.4  # + margins
    if need > fig.get_figwidth():
        fig.set_figwidth(need)


def save_figure(fig, path: Path) -> None:
    """The plot as PNG, atomically (``lora_fast.plots.save_png``); the layout is fitted already (``fit_width``)."""
    save_png(fig, path, dpi=110, tight=False)


def plots(dev: str, layer_rows: list[dict], idx: dict, out_dir: Path) -> list[str]:
    """Write the PNGs for one device; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    by_dtype = defaultdict(list)
    for cfg, c in layer_configs(layer_rows):
        by_dtype[cfg["dtype"]].append((cfg, c))
    for dtype, cfgs in by_dtype.items():
        combos = sorted({(cfg["r"], cfg["dropout"]) for cfg, _ in cfgs})
        r, p = (16, 0.1) if (16, 0.1) in combos else combos[0]
        cfgs = [(cfg, c) for cfg, c in cfgs if (cfg["r"], cfg["dropout"]) == (r, p)]
        names = {cfg["layer"] for cfg, _ in cfgs}
        layers = [n for n in LAYERS if n in names] + sorted(names - set(LAYERS))  # a layer of another CSV: last
        fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
        for ax, name in zip(axes[0], layers, strict=True):
            for prov in PROVIDERS:
                pts = sorted(((cfg["M"], idx[k]) for cfg, c in cfgs if cfg["layer"] == name
                              and (k := ("layer", dev, c, prov, "full", "time")) in idx), key=lambda t: t[0])
                if pts:
                    ms = [float(row["p50"]) for _, row in pts]
                    lo = [float(row["p50"]) - float(row["p20"]) for _, row in pts]
                    hi = [float(row["p80"]) - float(row["p50"]) for _, row in pts]
                    ax.errorbar([m for m, _ in pts], ms, yerr=[lo, hi], marker="o", capsize=3, label=prov,
                                color=provider_color(prov))
            ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="ms (p50, full)", title=name)
            m_values = sorted({cfg["M"] for cfg, _ in cfgs})
            ax.set_xticks(m_values, [str(m) for m in m_values])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
        handles = {}
        for ax in axes[0]:
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        drawn = [idx[k] for _, c in cfgs for prov in PROVIDERS
                 if (k := ("layer", dev, c, prov, "full", "time")) in idx]
        legend = fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=max(len(handles), 1),
                            fontsize=8, bbox_to_anchor=(0.5, 0.05))
        title = fig.suptitle(f"{dev} · {dtype} · r={r} · dropout={p} · forward+backward")
        footer = fig.text(0.5, 0.01, figure_stamp(drawn) if drawn else "", ha="center", va="bottom", fontsize=8)
        fit_width(fig, [title, footer, legend])
        fig.tight_layout(rect=(0, 0.14, 1, 1))
        name = f"layer_time_{slug(dev)}_{dtype}.png"
        save_figure(fig, out_dir / name)
        plt.close(fig)
        written.append(name)

        m_max = max(cfg["M"] for cfg, _ in cfgs)
        at_max = {cfg["layer"]: c for cfg, c in cfgs if cfg["M"] == m_max}
        saved = {prov: [p50(idx, "layer", dev, at_max[n], prov, "fwd", "saved_bytes") if n in at_max else None
                        for n in layers] for prov in PROVIDERS}
        saved = {prov: vals for prov, vals in saved.items() if any(v is not None for v in vals)}
        if not saved:
            continue
        drawn = [idx[k] for n in layers if n in at_max for prov in saved
                 if (k := ("layer", dev, at_max[n], prov, "fwd", "saved_bytes")) in idx]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.8 / len(saved)  # the drawn providers side by side, the layer's tick under their middle
        for i, (prov, vals) in enumerate(saved.items()):
            xs = [j + i * width for j in range(len(layers))]
            ax.bar([x for x, v in zip(xs, vals, strict=True) if v is not None],
                   [v / 2**20 for v in vals if v is not None], width, label=prov, color=provider_color(prov))
            for x, v in zip(xs, vals, strict=True):  # not measured (a stage cut short) is no bar of 0 MB
                if v is None:
                    ax.text(x, 0, "not measured", rotation=90, ha="center", va="bottom", fontsize=6)
        ax.set_xticks([j + (len(saved) - 1) * width / 2 for j in range(len(layers))], layers)
        ax.set(ylabel="saved activations (MB)")
        title = fig.suptitle(f"{dev} · {dtype} · M={m_max} · r={r} · dropout={p}")
        footer = fig.text(0.5, 0.01, figure_stamp(drawn), ha="center", va="bottom", fontsize=8)
        ax.legend(fontsize=8)
        fit_width(fig, [title, footer])
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        name = f"layer_saved_{slug(dev)}_{dtype}.png"
        save_figure(fig, out_dir / name)
        plt.close(fig)
        written.append(name)
    return written


def render(csv_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``SUMMARY.md`` and the plots for every device in the CSV; returns the summary's path. A missing file, a
    file with no rows and a row ``check_rows`` refuses are errors (``utils.read_csv`` reads a missing file as
    empty, which would call a misspelt path "no results")."""
    if not Path(csv_path).exists():
        raise FileNotFoundError(f"{csv_path} does not exist (run benchmarks.bench_layer / bench_gpt2 first, or "
                                "name the results CSV with --csv)")
    if not Path(csv_path).is_file():
        raise ValueError(f"{csv_path} is not a file (name the results CSV with --csv)")
    rows = utils.read_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows: no results to report (run benchmarks.bench_layer / bench_gpt2 "
                         "first)")
    check_rows(rows, csv_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = index(rows)
    devices = sorted({r["device"] for r in rows}, key=lambda d: (d == "cpu", d))  # GPUs first
    lines = ["# lora_fast benchmark summary", "",
             f"Generated by `python -m benchmarks.report` from `{Path(csv_path).name}` ({len(rows)} rows).", "",
             *not_shown(rows)]
    for dev in devices:
        dev_rows = [r for r in rows if r["device"] == dev]
        layer_rows = [r for r in dev_rows if r["bench"] == "layer"]
        gpt2_rows = [r for r in dev_rows if r["bench"] == "gpt2"]
        lines += [f"## Device: {dev}", "", provenance(dev_rows), ""]
        if dev == "cpu":
            lines += ["> **CPU numbers, not the product's GPU claims.** " + utils.CPU_TIMING_NOTE + " The `lora_fast` "
                      "provider (Triton kernels) is not timed on a CPU; the times below compare PyTorch paths only, "
                      "on a shared 2-core machine (noisy).", ""]
        if layer_rows:
            lines += layer_section(dev, layer_rows, idx)
            for name in plots(dev, layer_rows, idx, out_dir):
                lines += [f"![{name}]({name})", ""]
        if gpt2_rows:
            lines += gpt2_section(dev, gpt2_rows, idx)
        if dev != "cpu":
            lines += target_section(dev, idx, layer_rows, gpt2_rows)
    summary = out_dir / "SUMMARY.md"
    write_atomic(summary, "\n".join(lines) + "\n")  # never a half-written summary (nor two renders' mix)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("--csv", default=str(utils.DEFAULT_CSV))
    p.add_argument("--out", default=str(utils.RESULTS_DIR), help="directory for SUMMARY.md and the PNGs")
    args = p.parse_args(argv)
    try:
        summary = render(args.csv, args.out)
    except (OSError, ValueError) as e:  # bad input (or an unwritable --out): one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
