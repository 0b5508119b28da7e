"""README.md as the users' contract: what it shows or states is what the code does.

Read from README.md itself (never copied here), so an edit of either side that breaks the contract fails:
the API overview's code block runs (the hub load replaced by GPT-2 124M's config, randomly initialised) and prints
what its comments say; the API table's signatures are the functions' own; every ``--flag`` of the CLI section is an
option of the command it is given to, and the main command parses; the defaults stated for ``lora-fast sweep`` are the
parser's; files, modules and ``lora_fast.*`` names it mentions exist; the extras it names are in setup.py; the GPU
figures it quotes are those of the committed result files.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import importlib
import inspect
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lora_fast
from lora_fast.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = ROOT / "benchmarks" / "results"
H100_RUN = RESULTS / "h100_2026-11-22"  # the lease whose figures the README's Status paragraph quotes
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def section(title: str) -> str:
    """The README text under ``## <title>...`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def stated(pattern: str, text: str = README) -> tuple[str, ...]:
    """The groups of ``pattern`` in the README (whitespace-insensitive), or a failure naming the missing claim."""
    match = re.search(pattern.replace(" ", r"\s+"), text)
    assert match, f"README.md no longer states /{pattern}/: update this test with the README's new wording"
    return match.groups()


# --- the API overview's code block -------------------------------------------------------------------------------


def test_api_overview_block_runs_and_prints_what_its_comments_say():
    (code,) = fenced(section("API overview"), "python")
    hub = 'GPT2LMHeadModel.from_pretrained("gpt2")'
    assert code.count(hub) == 1, "the block's model load changed: update the substitution below"
    # the same architecture without the hub: GPT2Config() is GPT-2 124M (random weights change no count or type)
    code = "from transformers import GPT2Config\n" + code.replace(hub, "GPT2LMHeadModel(GPT2Config())")
    lines = code.splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("# ... train"))  # the comment standing for training
    setup, rest = "\n".join(lines[:cut]), "\n".join(lines[cut + 1 :])
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(setup, "README.md (API overview)", "exec"), ns)
    model = ns["model"]

    # "train: only the LoRA parameters require grad"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora\.lora_[AB]$", n) for n in trainable), sorted(trainable)[:4]

    # "print(...)  # {...}": the printed dict has the comment's keys, in order, and its values where it gives one
    printed = iter(out.getvalue().splitlines())
    for line in setup.splitlines():
        if line.startswith("print(") and "#" in line:
            said, got = ast.literal_eval(line.split("#", 1)[1].strip()), ast.literal_eval(next(printed))
            assert list(got) == list(said), f"{line!r} prints keys {list(got)}"
            assert {k: v for k, v in said.items() if v is not Ellipsis} == {
                k: got[k] for k in said if said[k] is not Ellipsis
            }, line
    # the block's trainable count is r·(in + out) summed over the projections it targets
    targets = re.search(r"target_modules=(\[[^]]*\])", setup).group(1)
    rank = int(re.search(r"rank=(\d+)", setup).group(1))
    wrapped = lora_fast.lora_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(ast.literal_eval(targets))
    assert lora_fast.count_parameters(model)["trainable"] == sum(
        rank * (m.in_features + m.out_features) for m in wrapped.values()
    )

    # "the original module types, ΔW folded in": a trained (B ≠ 0) adapter's logits, then the merged plain model's
    base_types = {n: type(m.linear) for n, m in wrapped.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for m in wrapped.values():
            m.lora.lora_B.normal_(std=0.02)  # std: a visible ΔW that keeps GPT-2's activations in range
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
    exec(compile(rest, "README.md (API overview)", "exec"), ns)
    plain = ns["plain"]
    assert not any(isinstance(m, lora_fast.LinearWithLoRA) for m in plain.modules())
    assert {n: type(plain.get_submodule(n)) for n in base_types} == base_types
    with torch.no_grad():
        merged = plain(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)  # fp32 merge: rounding only


# --- the API table ---------------------------------------------------------------------------------------------


def _readme_params(args: str) -> list[tuple[str, bool, object]]:
    """(name, keyword_only, default or inspect.Parameter.empty) of a README signature's argument list."""
    fn = ast.parse(f"def _({args}): pass").body[0].args
    positional = [(a.arg, False) for a in fn.args]
    defaults = [inspect.Parameter.empty] * (len(fn.args) - len(fn.defaults)) + [
        ast.literal_eval(d) for d in fn.defaults
    ]
    kw = [
        (a.arg, True, inspect.Parameter.empty if d is None else ast.literal_eval(d))
        for a, d in zip(fn.kwonlyargs, fn.kw_defaults, strict=True)
    ]
    return [(n, k, d) for (n, k), d in zip(positional, defaults, strict=True)] + kw


def _code_params(obj) -> list[tuple[str, bool, object]]:
    params = [p for p in inspect.signature(obj).parameters.values() if p.name != "self" and p.name[0] != "_"]
    return [(p.name, p.kind == p.KEYWORD_ONLY, p.default) for p in params]


def _table_signatures() -> list[tuple[str, str | None]]:
    table = re.search(r"^\| name \| what \|\n(.*?)\n\n", section("API overview"), re.M | re.S).group(1)
    cells = [row.split(" | ")[0] for row in table.splitlines()[1:]]
    found = []
    for cell in cells:
        for span in re.findall(r"`([^`]*)`", cell):
            for name, args in re.findall(r"([\w.]+)\(([^()]*)\)", span) or [(span, None)]:
                found.append((name, args))
    return found


def _resolve(name: str):
    if name.startswith("."):
        return getattr(lora_fast.LinearWithLoRA, name[1:])
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module) if module else lora_fast, attr)


# LinearWithLoRA parses its arguments itself (two forms): read each README parameter back from the built layer
_LAYER_ATTRS = {
    "in_features": lambda m: m.in_features,
    "out_features": lambda m: m.out_features,
    "rank": lambda m: m.lora.rank,
    "alpha": lambda m: m.lora.alpha,
    "dropout": lambda m: m.lora.dropout,
    "use_rslora": lambda m: m.lora.use_rslora,
    "bias": lambda m: m.linear.bias is not None,
    "backend": lambda m: m.backend,
    "device": lambda m: m.linear.weight.device,
    "dtype": lambda m: m.linear.weight.dtype,
}
_OTHER = {
    "in_features": 6,
    "out_features": 5,
    "rank": 3,
    "alpha": 5.0,
    "dropout": 0.25,
    "use_rslora": True,
    "bias": False,
    "backend": "reference",
    "device": torch.device("cpu"),
    "dtype": torch.float64,
}
_NONE_MEANS = {"device": torch.device("cpu"), "dtype": torch.get_default_dtype()}  # torch's own defaults


def _check_layer_form(params):
    first, *rest = params
    make_first = (lambda: nn.Linear(6, 5)) if first[0] == "base" else (lambda: 6)
    required = [n for n, kw, d in rest if d is inspect.Parameter.empty]
    req_values = [_OTHER[n] for n in required]
    layer = lora_fast.LinearWithLoRA(make_first(), *req_values)
    for name, _, default in rest:  # the defaults, as stated
        if default is not inspect.Parameter.empty:
            want = _NONE_MEANS.get(name, default) if default is None and name in _NONE_MEANS else default
            assert _LAYER_ATTRS[name](layer) == want, f"LinearWithLoRA({first[0]}, ...): default {name}"
    positional = [n for n, kw, _ in rest if not kw]
    keyword = {n: _OTHER[n] for n, kw, _ in rest if kw and not (first[0] == "base" and n in ("device", "dtype"))}
    layer = lora_fast.LinearWithLoRA(make_first(), *[_OTHER[n] for n in positional], **keyword)
    for name in positional + list(keyword):  # every argument lands where the README's order puts it
        assert _LAYER_ATTRS[name](layer) == _OTHER[name], f"LinearWithLoRA({first[0]}, ...): {name}"
    if any(kw for _, kw, _ in rest):  # one more positional argument than the README's `*` allows is refused
        with pytest.raises(TypeError):
            lora_fast.LinearWithLoRA(make_first(), *[_OTHER[n] for n in positional], "reference")


def test_api_table_signatures_are_the_functions_own():
    sigs = _table_signatures()
    assert len(sigs) >= 15, sigs  # the table was found and parsed
    for name, args in sigs:
        if args is None:  # an attribute (`.merged`)
            assert hasattr(lora_fast.LinearWithLoRA(nn.Linear(4, 4)), name.lstrip(".")), name
            continue
        obj = _resolve(name)
        if args.strip() == "...":
            assert callable(obj), name
        elif obj is lora_fast.LinearWithLoRA:
            _check_layer_form(_readme_params(args))
        else:
            assert _code_params(obj) == _readme_params(args), f"README's {name}({args}) vs the code's"


# --- the CLI section -------------------------------------------------------------------------------------------


def _options(cmd: str, capsys) -> set[str]:
    """The option strings ``lora-fast <cmd> --help`` lists (through the real entry point)."""
    with pytest.raises(SystemExit) as e:
        cli_main([cmd, "--help"])
    assert e.value.code == 0
    return set(FLAG.findall(capsys.readouterr().out))


def test_every_flag_the_cli_section_names_is_an_option_of_its_command(capsys):
    text = section("Fine-tune GPT-2")
    opts = {cmd: _options(cmd, capsys) for cmd in ("train", "sweep", "merge")}
    named = set(FLAG.findall(text))
    assert len(named) > 30, named  # the section was found
    assert not named - set.union(*opts.values()), (
        f"flags no command accepts: {sorted(named - set.union(*opts.values()))}"
    )
    # the sentence listing train's options, the sweep bullet, merge's usage line: each against its own command
    train_list = text[text.index("Options follow") : text.index("can come from")]
    sweep_text = text[text.index("- `lora-fast sweep`") : text.index("`lora-fast merge --")]
    merge_usage = re.search(r"`lora-fast merge --[^`]*`", text).group(0)
    for cmd, part in (("train", train_list), ("sweep", sweep_text), ("merge", merge_usage)):
        missing = set(FLAG.findall(part)) - opts[cmd]
        assert not missing, f"README gives {sorted(missing)} to lora-fast {cmd}, which has no such option"
    # Scaling out: every flag but the launchers' own (before `-m`, or named as torchrun's) is train's
    scaling = section("Scaling out")
    launcher = {
        f for cmd in re.findall(r"`(?:torchrun|accelerate launch) ([^`]*?) -m ", scaling) for f in FLAG.findall(cmd)
    }
    launcher |= set(re.findall(r"(?:torchrun|accelerate)'s\s+`(--[\w-]+)`", scaling))
    ours = set(FLAG.findall(scaling)) - launcher
    assert launcher and ours, (launcher, ours)
    assert not ours - opts["train"], f"README gives {sorted(ours - opts['train'])} to lora_fast.train under a launcher"


def test_main_command_parses_as_written():
    from lora_fast.train_args import parse_train_args

    lines = README.splitlines()
    command = lines[lines.index("<!-- main-command -->") + 2]
    argv = shlex.split(command.split("lora-fast train", 1)[1])
    opts = parse_train_args(argv)  # raises ConfigError on a bad value
    for flag, value in zip(argv, argv[1:] + [""], strict=True):
        if flag.startswith("--") and not value.startswith("--") and value:
            assert str(getattr(opts, flag[2:])) == value or float(getattr(opts, flag[2:])) == float(value), flag


def test_sweep_defaults_are_the_parsers():
    from lora_fast import sweep

    text = section("Fine-tune GPT-2")
    defaults = vars(sweep.build_parser().parse_args([]))
    (ranks,) = stated(r"`--ranks` \(default ([\d ]+)\)", text)
    (alphas,) = stated(r"`--alphas` \(([\d ]+)\)", text)
    sets = stated(r"`--target_sets` \(default: the architecture's default targets vs `([^`]+)` — `([^`]+)` vs "
                  r"`([^`]+)` on GPT-2,", text)
    (grid,) = stated(r"`--grid ([a-z|-]+)`", text)
    (out_dir,) = stated(r"into `([^`]+)`", text[text.index("`lora-fast sweep`") :])
    assert defaults["ranks"] is None and sweep.DEFAULT_RANKS == [int(v) for v in ranks.split()]
    assert defaults["alphas"] is None and sweep.DEFAULT_ALPHAS == [float(v) for v in alphas.split()]
    from lora_fast.inject import DEFAULT_TARGET_MODULES

    assert sweep.DEFAULT_TARGET_SETS == [None, sets[0]] and list(sets[1:]) == [
        ",".join(DEFAULT_TARGET_MODULES["gpt2"]), sets[0]]
    grid_action = next(a for a in sweep.build_parser()._actions if a.dest == "grid")
    assert grid.split("|") == list(grid_action.choices)
    assert out_dir == sweep.DEFAULT_OUTPUT_DIR


# --- names, files, extras ---------------------------------------------------------------------------------------


def test_files_modules_and_names_the_readme_mentions_exist():
    paths = set(re.findall(r"(?<![\w/])((?:lora_fast|kernels|benchmarks|tests)/[\w./-]*)", README))
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert paths and not missing, f"README.md names missing files: {missing}"
    scripts = set(re.findall(r"python -m (benchmarks\.\w+)", README))
    assert len(scripts) >= 8 and all((ROOT / (s.replace(".", "/") + ".py")).is_file() for s in scripts), scripts
    names = set(re.findall(r"(?<![\w.:])lora_fast(?:\.[A-Za-z_]\w*)+", README))
    unresolved = [name for name in sorted(names) if not _exists(name)]
    assert names and not unresolved, f"README.md names what lora_fast does not have: {unresolved}"


def test_the_documents_the_readme_says_a_plain_text_file_holds(tmp_path):
    """The Data bullet says how a plain-text file is cut into documents (it did not: a file of one text per line,
    as `datasets`' text loader reads it, is one document here, and validation its tail), and the reader does so."""
    from lora_fast.data import read_text_file

    said = " ".join(README.split())
    assert "a plain-text file (a document per blank-line separated paragraph: lines with no blank line between " \
           "them are one document" in said
    f = tmp_path / "d.txt"
    f.write_text("line one\nline two\n\nsecond paragraph\n")
    assert read_text_file(f) == ["line one\nline two", "second paragraph"]


def _exists(dotted: str) -> bool:
    """A module, or an attribute of one (``lora_fast.rng.keep_mask_numpy``, lazily resolved names too)."""
    try:
        importlib.import_module(dotted)
        return True
    except ImportError:
        module, _, attr = dotted.rpartition(".")
        try:
            return hasattr(importlib.import_module(module), attr)
        except ImportError:
            return False


def test_extras_the_set_up_names_exist_with_what_it_says_they_hold():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    text = section("Set-up")
    named = set(re.findall(r"\[(\w+)\]", text))
    assert named and named <= set(extras), f"README names extras {sorted(named - set(extras))} setup.py lacks"
    bare = {re.split(r"[<>=\[ ]", r)[0] for r in extras["dev"]}
    # "[dev] (everything, plus pytest, pytest-benchmark and peft)"
    needed = {re.split(r"[<>=\[ ]", r)[0] for name in named - {"dev"} for r in extras[name]}
    assert needed | {"pytest", "pytest-benchmark", "peft"} <= bare


# --- quoted figures and their files --------------------------------------------------------------------------


def _gpu_rows(bench: str) -> list[dict]:
    with open(RESULTS / "results.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["bench"] == bench and r["device"].startswith("NVIDIA H100")]


def _one(rows, **want) -> float:
    (value,) = [float(r["p50"]) for r in rows if all(r[k] == v for k, v in want.items())]
    return value


def test_status_figures_are_those_of_the_committed_results():
    status = README[README.index("**Status (H100") :]
    # per layer, CUDA-graph GPU time (probe JSON): lora_fast vs PEFT and vs the frozen base, as a range
    cases = json.loads((H100_RUN / "probe_p0.1.json").read_text())["cases"]
    vs_peft = [c["graph_ms"]["layer_peft"] / c["graph_ms"]["layer_lora_fast"] for c in cases]
    vs_base = [c["graph_ms"]["layer_lora_fast"] / c["graph_ms"]["layer_base"] for c in cases]
    said = stated(
        r"is ([\d.]+)–([\d.]+)× faster than PEFT's layer but still ([\d.]+)–([\d.]+)× the frozen base", status
    )
    assert [float(v) for v in said] == [round(v, 1) for v in (min(vs_peft), max(vs_peft), min(vs_base), max(vs_base))]
    # saved activations of c_attn (bench_layer rows: bytes, shown in MiB as the summary shows them)
    layer = [
        r for r in _gpu_rows("layer") if json.loads(r["config"])["layer"] == "c_attn" and r["metric"] == "saved_bytes"
    ]
    ours, peft = stated(r"activations kept are ([\d.]+) MB vs PEFT's ([\d.]+) MB per c_attn layer", status)
    assert float(ours) == round(_one(layer, provider="lora_fast") / 2**20, 1)
    assert float(peft) == round(_one(layer, provider="peft") / 2**20, 1)
    # the GPT-2 training step (bench_gpt2 rows)
    step = [r for r in _gpu_rows("gpt2") if r["mode"] == "train"]
    speed, memory = stated(r"training step is ([\d.]+)× PEFT's tokens/s with (\d+) % lower peak memory", status)
    tps = [_one(step, provider=p, metric="tokens_per_s") for p in ("lora_fast", "peft")]
    mem = [_one(step, provider=p, metric="peak_mem") for p in ("lora_fast", "peft")]
    assert float(speed) == round(tps[0] / tps[1], 2)
    assert int(memory) == round(100 * (1 - mem[0] / mem[1]))


def test_train_parity_bound_covers_the_logged_difference():
    (bound,) = stated(r"tracks the reference path's loss curve within (\d+(?:\.\d+)?e-\d+)")
    (logged,) = re.findall(r"max rel diff ([\d.e+-]+)", (H100_RUN / "train_parity.log").read_text())
    assert float(logged) <= float(bound)


def test_model_zoo_architecture_count():
    (count,) = stated(r"tested on tiny models of (\d+) architectures")
    tree = ast.parse((ROOT / "tests" / "test_model_zoo.py").read_text())
    archs = next(n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ARCHS")
    assert int(count) == len(archs.keys)


# --- torch.export ------------------------------------------------------------------------------------------------


def test_exported_program_loads_after_import_lora_fast(tmp_path):
    """README: loading an exported program with LoRA layers in place needs `import lora_fast` (and no more)."""
    assert "`import lora_fast`" in section("API overview")
    layer = lora_fast.LinearWithLoRA(nn.Linear(8, 6), rank=2).eval()
    x = torch.randn(3, 8)
    program = torch.export.export(layer, (x,))
    assert any("lora_fast.lora_linear" in str(n.target) for n in program.graph.nodes)
    torch.export.save(program, tmp_path / "layer.pt2")
    torch.save({"x": x, "y": layer(x).detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch, lora_fast\n"
        "io = torch.load(sys.argv[2])\n"
        "y = torch.export.load(sys.argv[1]).module()(io['x'])\n"
        "torch.testing.assert_close(y, io['y'])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "layer.pt2"), str(tmp_path / "io.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.strip().splitlines()[-1:]
