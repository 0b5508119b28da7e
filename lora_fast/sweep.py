"""``lora-fast sweep``: the LoRA tutorials' experiments — rank, alpha and target modules — in one command.

Default grid ``one-at-a-time`` (as the tutorials vary one knob with the others at the baseline ``--rank`` /
``--alpha`` / first target set): ranks 2 4 8 16 32, alphas 4 8 16 32, targets the architecture's default (``c_attn``
on GPT-2) vs ``all-linear`` — 9 distinct runs. ``--grid full`` runs the whole product (40 runs by default). Data,
tokenizer and base model are prepared once and every run starts from a fresh copy of the base model, so runs differ
only in the LoRA setting.

Outputs in ``--output_dir`` (default ``outputs/lora-sweep``, written all at once like ``train``): one directory
per run (the full ``train`` outputs), ``sweep_results.md`` and ``sweep_results.csv`` (final eval loss and the step it
was taken at, perplexity, trainable parameters, training tokens/s — step 1 and evaluations left out, see
``train_tokens_per_sec`` in ``lora_fast.train_io.finish_metrics`` — peak memory, wall time, and ``status``: ok,
interrupted, or "failed: <error>" for a run that raised, which does not stop the sweep) and ``sweep_plot.png``.

Target modules: ``--target_sets`` lists the sets to compare. Without it, ``--target_modules`` (command line or
YAML) is the one set every run uses, so the sweep varies rank and alpha on the modules asked for; giving both in
one place is an error (the command line wins over the file). With neither, the sets are the architecture's default
targets (``c_attn`` on GPT-2, ``q_proj,v_proj`` on Llama: ``inject.DEFAULT_TARGET_MODULES``, as ``lora-fast train``
without ``--target_modules``) and ``all-linear``.

The grid options (``ranks``, ``alphas``, ``target_sets``, ``grid``) may come from ``--config`` too, as lists (a
set: comma-separated names, a list of names, or one regex); the command line wins.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import itertools
import json
import math
import re
import sys
from pathlib import Path

from lora_fast.train_args import (
    ConfigError,
    OptionParser,
    _convert,
    add_train_options,
    load_yaml,
    normalize_targets,
    resolve,
)
from lora_fast.train_model import log_stderr

COLUMNS = ("run", "rank", "alpha", "target_modules", "final_eval_loss", "final_eval_step", "final_perplexity",
           "trainable_params", "trainable_pct", "tokens_per_sec", "peak_memory_mb", "wall_time_s", "steps", "status")
DEFAULT_TARGET_SETS = [None, "all-linear"]  # None: the architecture's default targets (c_attn on GPT-2)
DEFAULT_RANKS = [2, 4, 8, 16, 32]
DEFAULT_ALPHAS = [4, 8, 16, 32]
GRID_OPTIONS = ("ranks", "alphas", "target_sets", "grid")  # the sweep's own options, from a config file too
GRIDS = ("one-at-a-time", "full")
DEFAULT_OUTPUT_DIR = "outputs/lora-sweep"
CHECKPOINT_OPTIONS = ("save_steps", "save_total_limit", "checkpoint_dir", "resume_from_checkpoint")  # refused here


def build_parser() -> argparse.ArgumentParser:
    p = OptionParser(prog="lora-fast sweep", description="Sweep LoRA rank, alpha and target modules")
    # still parsed, so that a sweep refuses them by name; out of --help: a sweep is one process and causal-lm
    add_train_options(p, hidden=(*CHECKPOINT_OPTIONS, "task", "distributed"),
                      shown_defaults={"output_dir": DEFAULT_OUTPUT_DIR})
    for action in p._actions:  # train's text names train's default; a sweep's is the sets of --target_sets
        if "--target_modules" in action.option_strings:
            action.help = ("one target-module set for every run (names, one regex, or all-linear); default: the "
                           "sets of --target_sets (the architecture's default targets vs all-linear)")
    p.add_argument("--ranks", nargs="+", default=None,
                   help=f"ranks to try (default: {' '.join(map(str, DEFAULT_RANKS))})")
    p.add_argument("--alphas", nargs="+", default=None,
                   help=f"alphas to try (default: {' '.join(map(str, DEFAULT_ALPHAS))})")
    p.add_argument("--target_sets", nargs="+", default=None,
                   help="target-module sets to try; names within a set are comma-separated (c_attn,c_proj) "
                   "(default: --target_modules as the only set, else the architecture's default targets — c_attn "
                   "on GPT-2 — vs all-linear)")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="one-at-a-time: vary one of rank, alpha, target set with the others at --rank/--alpha and "
                   "the first set; full: every combination (default: one-at-a-time)")
    return p


def _listed(value, name: str) -> list:
    """A grid option from a config file as a list (a lone number or set: a list of one); the command line's are
    lists of strings already."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{name}: an empty list (give at least one value)")
        return list(value)
    return [value]


def _target_set(value) -> str:
    """A config file's target set: a string (comma-separated names, or one regex) or a list of names."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return ",".join(v.strip() for v in value)
    if isinstance(value, str) and value.strip():
        return value
    raise ConfigError(f"target_sets: {value!r} is not a target-module set (comma-separated names, a list of names, "
                      "or one regex)")


def _numbers(values, kind, name):
    out = []
    for v in values:
        try:
            x = _convert(name, v, kind)  # as --rank / --alpha read theirs: "8.0" and "1e3" are integers
        except ConfigError:
            raise ConfigError(f"--{name}: {v!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(x) or x <= 0:
            raise ConfigError(f"--{name}: {v!r} must be a positive finite number")
        out.append(x)
    return out


def target_sets(ns, opts, file: dict | None = None) -> list[str | None]:
    """The target sets to sweep (None: the architecture's default targets): ``target_sets``; else
    ``target_modules`` as one set; else the defaults. Both in one place (the command line, or the config file
    ``file``) is an error — one of them would be ignored; across the two the command line wins, as everywhere."""
    file = file or {}
    if ns.target_sets is not None and ns.target_modules is not None:
        raise ConfigError("give either --target_sets (the sets to compare) or --target_modules (one set for every "
                          "run), not both")
    if ns.target_sets is None and ns.target_modules is None and "target_sets" in file and "target_modules" in file:
        raise ConfigError("the config file gives both target_sets (the sets to compare) and target_modules (one set "
                          "for every run); keep one")
    if ns.target_sets is not None:
        return list(ns.target_sets)
    if ns.target_modules is None and getattr(opts, "target_sets", None) is not None:
        return [_target_set(v) for v in _listed(opts.target_sets, "target_sets")]
    if opts.target_modules is None:
        return list(DEFAULT_TARGET_SETS)
    t = opts.target_modules
    return [t if isinstance(t, str) else ",".join(t)]  # normalize_targets splits names, keeps a regex whole


def default_targets(model) -> str:
    """The architecture's default target set of ``model`` as a set's spelling (names comma-joined, or a regex)."""
    from lora_fast.inject import _resolve_targets

    try:
        t = _resolve_targets(model, None)
    except ValueError as e:
        raise ConfigError(f"{e} (lora-fast sweep: --target_sets or --target_modules)") from None
    return t if isinstance(t, str) else ",".join(t)


def plan_runs(ranks, alphas, target_sets, base_rank, base_alpha, grid) -> list[dict]:
    """Distinct (rank, alpha, targets) settings, baseline first. ``targets`` keeps the user's spelling; the run
    name replaces what a directory name should not hold (a regex's ``\\``, ``*``, ...) by ``_``."""
    if grid == "full":
        combos = list(itertools.product(ranks, alphas, target_sets))
    else:
        t0 = target_sets[0]
        combos = [(base_rank, base_alpha, t0)] + [(r, base_alpha, t0) for r in ranks] \
            + [(base_rank, a, t0) for a in alphas] + [(base_rank, base_alpha, t) for t in target_sets]
    seen, runs, names = set(), [], set()
    for r, a, t in combos:
        targets = normalize_targets([t])  # "c_attn,c_proj", "c_proj, c_attn," and "c_attn,c_proj," are one set
        key = (r, a, tuple(sorted(targets)) if isinstance(targets, list) else targets)
        if key not in seen:
            seen.add(key)
            name = re.sub(r"[^A-Za-z0-9_.+-]", "_", t.replace(",", "+"))
            run, n = f"r{r}_a{a:g}_{name}", 2
            while run in names:  # two spellings that sanitise alike ("(0)" and "[0]") get distinct directories
                run, n = f"r{r}_a{a:g}_{name}-{n}", n + 1
            names.add(run)
            runs.append({"rank": r, "alpha": a, "targets": t, "run": run})
    return runs


def _table_md(rows) -> str:
    def fmt(v):
        if v is None:
            return "-"  # ASCII: the table is printed, and stdout may be ASCII (LC_ALL=C, PYTHONUTF8=0)
        text = (f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 1e4 else f"{v:.4g}" if isinstance(v, float)
                else f"{v:,}" if isinstance(v, int) else str(v))
        return text.replace("|", "\\|")  # a target regex's alternation must not split the cell

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _table_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def best_run(rows) -> dict | None:
    """The finished run with the lowest final eval loss (an interrupted, failed or diverged run is not a candidate)."""
    done = [r for r in rows if r["status"] == "ok" and r["final_eval_loss"] is not None]
    return min(done, key=lambda r: r["final_eval_loss"]) if done else None


def _failed_row(spec: dict, error: Exception) -> dict:
    """The table row of a run that raised: its setting, no metrics, and the error in ``status``."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    row = dict.fromkeys(COLUMNS)
    row.update(run=spec["run"], rank=spec["rank"], alpha=spec["alpha"], target_modules=spec["targets"],
               status=f"failed: {type(error).__name__}: {first}")
    return row


def _free_memory() -> None:
    """After a failed run (an out-of-memory error, say): drop its tensors before the next run starts."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(opts, runs, log=log_stderr) -> tuple[list[dict], bool]:
    """Train every run in ``runs`` (``plan_runs``' list, or a function of the loaded base model returning it: the
    default target set depends on the architecture) into a staged ``opts.output_dir``; returns (table rows,
    interrupted).

    A run that raises (out of memory at the largest rank, say) is a table row with ``status`` "failed: ..." and no
    metrics, and the sweep goes on: one failure does not cost the finished runs. Ctrl-C / SIGTERM stops the sweep
    after the current run saves what it trained; the table then holds the runs so far."""
    from lora_fast.distributed import held_signals
    from lora_fast.plots import check_plotting, sweep_plot
    from lora_fast.train import check_one_process, check_tf32, prepare, resolve_device, run_inputs, transformers_bars
    from lora_fast.train_io import StagedDir, check_output_dir, write_atomic

    out = check_output_dir(opts.output_dir, opts.overwrite, run_inputs(opts), opts.logdir)
    check_one_process(opts, "lora-fast sweep")
    check_plotting()
    check_tf32(getattr(opts, "tf32", None), resolve_device(opts.device))
    with transformers_bars(opts.progress):
        prep = prepare(opts, log)  # seeded with --seed, as in lora-fast train
    from lora_fast.train import check_rank

    if callable(runs):
        runs = runs(prep.model)

    for spec in runs:  # every target set must match, every rank fit, before minutes of training start
        try:
            check_rank(prep.model, normalize_targets([spec["targets"]]), spec["rank"], resolve_device(opts.device))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    staged = StagedDir(out, opts.overwrite, command="sweep", keep_stale=True)  # a killed sweep's: its finished runs
    rows, interrupted = [], False
    try:
        try:
            interrupted = _train_runs(opts, prep, runs, staged, rows, log)
        except KeyboardInterrupt:  # outside a run's own handler (between runs, while one sets up): the rows so far
            if not rows:
                raise
            interrupted = True
            log(f"lora-fast sweep: interrupted after {len(rows)} of {len(runs)} runs; writing their table")
        with held_signals() as held:  # the table of the finished runs: a signal now must not discard it
            write_atomic(staged.path / "sweep_results.md", _table_md(rows))
            write_atomic(staged.path / "sweep_results.csv", _table_csv(rows))
            plotted = [r for r in rows if r["final_eval_loss"] is not None and math.isfinite(r["final_eval_loss"])]
            if plotted:
                sweep_plot(staged.path / "sweep_plot.png", plotted)
            staged.commit()
            if held.signum:
                held.signum, interrupted = 0, True
    except BaseException:
        staged.discard()
        raise
    return rows, interrupted


def _train_runs(opts, prep, runs: list[dict], staged, rows: list[dict], log) -> bool:
    """Train each run into ``staged``, appending its table row to ``rows``; returns whether a run was
    interrupted (Ctrl-C / SIGTERM inside its training loop: it saved what it trained, and the sweep stops)."""
    from lora_fast.train import train
    from lora_fast.train_io import write_json

    for i, spec in enumerate(runs, 1):
        log(f"lora-fast sweep: run {i}/{len(runs)}: {spec['run']}")
        ro = copy.copy(opts)
        ro.rank, ro.alpha, ro.overwrite = spec["rank"], spec["alpha"], False
        ro.target_modules = normalize_targets([spec["targets"]])
        ro.output_dir = str(staged.path / spec["run"])
        ro.logdir = str(Path(opts.logdir).expanduser() / spec["run"]) if opts.logdir else None
        try:
            m = train(ro, prep, log=log)
        except Exception as e:  # noqa: BLE001  (any failure of one run: recorded, the sweep goes on)
            if isinstance(e, ConfigError) and not rows:  # the first run refused an option (the backend, say):
                raise  # every run would; exit 2, nothing written
            log(f"lora-fast sweep: run {spec['run']} failed: {type(e).__name__}: {e}")
            rows.append(_failed_row(spec, e))
            m = None
        if m is None:  # outside the except block: the exception (and its frames' tensors) is released
            _free_memory()
            continue
        recorded = staged.path / spec["run"] / "training_args.json"  # it names the staging directory: the final one
        if recorded.is_file():
            args = json.loads(recorded.read_text(encoding="utf-8"))
            args["output_dir"] = str(Path(opts.output_dir).expanduser().resolve() / spec["run"])
            write_json(recorded, args)
        p = m["parameters"]
        loss = m["final_eval_loss"]
        status = ("interrupted" if m["interrupted"] else
                  "diverged (eval loss not finite)" if loss is not None and not math.isfinite(loss) else "ok")
        rows.append({"run": spec["run"], "rank": spec["rank"], "alpha": spec["alpha"],
                     "target_modules": spec["targets"], "final_eval_loss": m["final_eval_loss"],
                     "final_eval_step": m["final_eval_step"],
                     "final_perplexity": m["final_perplexity"], "trainable_params": p["trainable"],
                     "trainable_pct": p["percentage"], "tokens_per_sec": m["train_tokens_per_sec"],
                     "peak_memory_mb": m["peak_memory_mb"], "wall_time_s": m["wall_time_s"],
                     "steps": m["steps"], "status": status})
        if m["interrupted"]:
            log("lora-fast sweep: interrupted; writing the table of the runs so far")
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lora-fast sweep``; returns the exit status (0, 1 some run failed, 2 bad input, 130
    interrupted)."""
    ns = build_parser().parse_args(argv)
    try:
        file = load_yaml(ns.config, GRID_OPTIONS) if ns.config else {}
        if ns.output_dir is None and file.get("output_dir") is None:
            ns.output_dir = DEFAULT_OUTPUT_DIR
        opts = resolve(ns, GRID_OPTIONS)
        ranks = _numbers(_listed(opts.ranks if opts.ranks is not None else DEFAULT_RANKS, "ranks"), int, "ranks")
        alphas = _numbers(_listed(opts.alphas if opts.alphas is not None else DEFAULT_ALPHAS, "alphas"), float,
                          "alphas")
        grid = opts.grid if opts.grid is not None else GRIDS[0]
        if grid not in GRIDS:
            raise ConfigError(f"grid must be one of {list(GRIDS)}, got {grid!r}")
        if opts.task != "causal-lm":
            raise ConfigError("lora-fast sweep runs --task causal-lm only")
        given = [f"--{k}" for k in CHECKPOINT_OPTIONS if getattr(opts, k) is not None]
        if given:
            raise ConfigError(f"lora-fast sweep does not checkpoint ({', '.join(given)}); train the configuration "
                              "to resume with lora-fast train")
        fixed = [k for k in ("rank", "alpha") if getattr(ns, k) is not None or file.get(k) is not None]
        if grid == "full" and fixed:
            where = " and ".join(f"--{k}" if getattr(ns, k) is not None else f"{k} (config file)" for k in fixed)
            raise ConfigError(f"--grid full runs every combination of --ranks and --alphas; {where} (the "
                              "one-at-a-time baseline) would be ignored: put them into --ranks/--alphas")
        sets = target_sets(ns, opts, file)
        for t in sets:  # a malformed set is refused now, not after loading (the default one is the model's)
            if t is not None:
                normalize_targets([t])

        def runs(model):  # the default set is the loaded architecture's
            named = [default_targets(model) if t is None else t for t in sets]
            return plan_runs(ranks, alphas, named, opts.rank, opts.alpha, grid)
        from lora_fast.train import sigterm_as_interrupt

        with sigterm_as_interrupt():  # SIGTERM stops the current run like Ctrl-C: the runs so far are kept
            rows, interrupted = run_sweep(opts, runs)
    except ConfigError as e:
        print(f"lora-fast sweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-fast sweep: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(_table_md(rows))
    best = best_run(rows)
    if best is not None:
        print(f"Best: {best['run']} (eval loss {best['final_eval_loss']:.4g} at step {best['final_eval_step']})")
    plot = ", sweep_plot.png" if any(r["final_eval_loss"] is not None and math.isfinite(r["final_eval_loss"])
                                     for r in rows) else ""
    print(f"Sweep outputs in {opts.output_dir}: sweep_results.md, sweep_results.csv{plot}, one directory per run")
    failed = [r["run"] for r in rows if r["status"].startswith("failed")]
    if failed:
        print(f"lora-fast sweep: {len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); see the status "
              "column", file=sys.stderr)
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    from lora_fast.cli import run_console

    sys.exit(run_console(main))
