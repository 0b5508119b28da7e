"""Options of ``lora-fast train`` / ``sweep``: one table, parsed from the command line and an optional YAML file.

Precedence (lowest to highest): the defaults below, the keys of ``--config config.yaml``, the command line. YAML
keys are the option names without dashes (``rank: 16``, ``target_modules: [c_attn, c_proj]``); an unknown key is
an error, never ignored. Every value — from either source — goes through the same checks (``validate``), so that
``rank: 0`` in a YAML file fails exactly like ``--rank 0`` does, with a one-line message naming the option.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from pathlib import Path

BACKEND_CHOICES = ("auto", "reference", "triton")
DISTRIBUTED_CHOICES = ("auto", "none", "ddp", "fsdp")
TASK_CHOICES = ("causal-lm", "classification")
_REGEX_CHARS = set("*+?[](){}|^$\\")
BASE_DTYPES = ("float32", "bfloat16", "float16", "auto")


class ConfigError(ValueError):
    """Bad option value or config file; the CLI prints it as one line and exits with status 2 (under torchrun, rank
    0 prints it: every rank fails alike)."""


class RankConfigError(ConfigError):
    """A ConfigError that may arise on some ranks only (their GPUs, their environment): every rank prints it."""


def env_true(name: str) -> bool:
    """An environment switch set on, spelt as users and launchers do (``1``, ``true``, ``yes``, ``on``, any case,
    spaces around): ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, accelerate's ``ACCELERATE_USE_FSDP``."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _pos_int(v):
    return isinstance(v, int) and v >= 1


def _pos_float(v):
    return math.isfinite(v) and v > 0


# name: (type, default, check or None, what the check requires, help)
OPTIONS: dict[str, tuple] = {
    "model": (str, "gpt2", None, "", "local model directory, hub name, or 'gpt2-random' (GPT-2 124M, random init)"),
    "task": (str, "causal-lm", lambda v: v in TASK_CHOICES, f"one of {TASK_CHOICES}", "causal-lm or classification"),
    "dataset": (str, None, None, "", "text/JSON lines/CSV file (a directory of train/validation/test CSVs for "
                "classification) or a `datasets` hub name (NAME, or NAME:CONFIG such as wikitext:wikitext-2-raw-v1); "
                "default: Python's pydoc_data.topics corpus"),
    "text_column": (str, None, None, "", "column/field holding the text (default: 'text' or 'Text')"),
    "rank": (int, 8, _pos_int, "a positive integer", "LoRA rank r"),
    "alpha": (float, 16.0, _pos_float, "a positive number", "LoRA alpha (scaling = alpha / rank)"),
    "dropout": (float, 0.0, lambda v: 0.0 <= v < 1.0, "in [0, 1)", "dropout on the LoRA input"),
    "use_rslora": (bool, False, None, "", "scale by alpha/sqrt(rank) (rank-stabilised LoRA)"),
    "target_modules": (list, None, None, "", "module names (space- or comma-separated), one regex, or "
                       "'all-linear' (default: the architecture's, c_attn for GPT-2)"),
    "epochs": (float, 1.0, _pos_float, "a positive number", "passes over the training data"),
    "max_steps": (int, None, _pos_int, "a positive integer", "optimizer steps (overrides --epochs)"),
    "batch_size": (int, 8, _pos_int, "a positive integer", "sequences per micro-batch"),
    "gradient_accumulation_steps": (int, 1, _pos_int, "a positive integer", "micro-batches per optimizer step"),
    "lr": (float, 3e-4, _pos_float, "a positive number", "peak learning rate (AdamW)"),
    "weight_decay": (float, 0.0, lambda v: math.isfinite(v) and v >= 0, "a number >= 0", "AdamW weight decay"),
    "warmup_ratio": (float, 0.05, lambda v: 0.0 <= v <= 1.0, "in [0, 1]", "fraction of steps of linear warm-up"),
    "max_grad_norm": (float, 1.0, lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (0 disables)",
                      "gradient clipping norm"),
    "max_length": (int, 128, lambda v: isinstance(v, int) and v >= 2, "an integer >= 2", "tokens per sequence"),
    "eval_steps": (int, 50, _pos_int, "a positive integer", "evaluate every N optimizer steps (and at the end)"),
    "eval_batches": (int, None, _pos_int, "a positive integer",
                     "cap on evaluation batches (default: all), each a global batch: batch_size x processes x "
                     "gradient_accumulation_steps sequences"),
    "val_fraction": (float, 0.1, lambda v: 0.0 < v < 1.0, "in (0, 1)", "held-out share when the data has no "
                     "validation split"),
    "base_dtype": (str, "float32", lambda v: v in BASE_DTYPES, f"one of {BASE_DTYPES}",
                   "dtype the frozen base model is loaded in (auto: the checkpoint's). LoRA weights stay fp32; "
                   "bfloat16/float16 halve the base's memory (--task classification needs float32: its head is "
                   "trained whole)"),
    "gradient_checkpointing": (bool, False, None, "", "recompute each block's activations during the backward "
                               "(transformers' activation checkpointing, non-reentrant): less activation memory for "
                               "about one more forward; the same numbers"),
    "fp16": (bool, False, None, "", "float16 autocast (+ gradient scaling)"),
    "bf16": (bool, False, None, "", "bfloat16 autocast"),
    "tf32": (bool, None, None, "", "fp32 matmuls on TF32 tensor cores (CUDA, Ampere or newer), as HF's --tf32; "
             "--no-tf32 forces IEEE fp32 (default: torch's setting, off)"),
    "seed": (int, 42, lambda v: isinstance(v, int) and 0 <= v < 2**63, "an integer in [0, 2**63)", "random seed"),
    "output_dir": (str, "outputs/lora-gpt2", None, "", "where the adapter, metrics and plots go"),
    "overwrite": (bool, False, None, "", "replace a non-empty output directory"),
    "backend": (str, None, lambda v: v in BACKEND_CHOICES, f"one of {BACKEND_CHOICES}",
                "LoRA kernels: auto (Triton where it runs, else the reference), reference or triton (default: "
                "the LORA_FAST_BACKEND environment variable, as in the library, else auto)"),
    "device": (str, "auto", None, "", "auto (cuda when available), cpu, cuda, cuda:1, ..."),
    "logdir": (str, None, None, "", "TensorBoard log directory (needs the tensorboard package)"),
    "num_workers": (int, 0, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0", "DataLoader workers"),
    "progress": (bool, True, None, "", "tqdm progress bar (--no-progress to hide)"),
    "save_steps": (int, None, _pos_int, "a positive integer", "write a resumable checkpoint every N optimizer "
                   "steps (and when interrupted) into --checkpoint_dir"),
    "save_total_limit": (int, None, _pos_int, "a positive integer", "keep only the newest N checkpoints "
                         "(default: all)"),
    "checkpoint_dir": (str, None, None, "", "where checkpoints go (default: <output_dir>-checkpoints, beside the "
                       "output directory)"),
    "resume_from_checkpoint": (str, None, None, "", "continue a run from a checkpoint directory, or 'latest' (the "
                               "newest in --checkpoint_dir); the run's other options must be the same"),
    "distributed": (str, "auto", lambda v: v in DISTRIBUTED_CHOICES, f"one of {DISTRIBUTED_CHOICES}",
                    "under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard); auto is ddp when "
                    "WORLD_SIZE > 1, none otherwise. Global batch = batch_size x world size x accumulation"),
}


# Option names of HF's TrainingArguments / PEFT's LoraConfig / HF's example scripts that users bring along: the
# option of lora-fast's (the one doing that job) suggested for them.
ALIASES = {
    "learning_rate": "lr", "lora_alpha": "alpha", "r": "rank", "lora_r": "rank", "lora_rank": "rank",
    "lora_dropout": "dropout", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size", "model_name_or_path": "model", "base_model_name_or_path": "model",
    "dataset_name": "dataset", "train_file": "dataset", "max_seq_length": "max_length", "block_size": "max_length",
    "logging_dir": "logdir", "warmup_steps": "warmup_ratio", "dataloader_num_workers": "num_workers",
    "eval_strategy": "eval_steps", "evaluation_strategy": "eval_steps", "save_strategy": "save_steps",
    "gradient_accumulation": "gradient_accumulation_steps", "resume": "resume_from_checkpoint",
}


def suggestion(name: str, known) -> str | None:
    """The known option meant by an unknown ``name``: its HF/PEFT alias's counterpart, else a close spelling."""
    name = name.replace("-", "_")
    known = list(known)
    if ALIASES.get(name) in known:
        return ALIASES[name]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return close[0] if close else None


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose "unrecognized arguments" error suggests the option meant (``suggestion``): HF's
    ``--learning_rate`` is lora-fast's ``--lr``, ``--rnak`` its ``--rank``. PEFT's ``--r``, a prefix of several
    options, is argparse's "ambiguous option": its alias is named there too."""

    def error(self, message: str):
        known = [s[2:] for s, a in self._option_string_actions.items()  # hidden ones: the command refuses them
                 if s.startswith("--") and a.help is not argparse.SUPPRESS]
        if message.startswith("unrecognized arguments:"):
            flags = [t.split("=")[0] for t in message.split(":", 1)[1].split() if t.startswith("--")]
            hints = [f"{f}: did you mean --{m}?" for f in flags if (m := suggestion(f[2:], known))]
            message += f" ({'; '.join(hints)})" if hints else ""
        elif message.startswith("ambiguous option: --"):  # "ambiguous option: --r could match --rank, ..."
            flag = message.split()[2].split("=")[0]
            if ALIASES.get(flag[2:]) in known:
                message += f" ({flag}: did you mean --{ALIASES[flag[2:]]}?)"
        super().error(message)


def add_train_options(parser: argparse.ArgumentParser, hidden: tuple[str, ...] = (),
                      shown_defaults: dict | None = None) -> None:
    """Add every option of ``OPTIONS`` (plus ``--config``) to ``parser``; defaults are resolved in ``parse``.

    ``hidden``: options still parsed (so that the command can refuse them with its own message) but left out of
    ``--help``. ``shown_defaults``: defaults the command sets itself, shown instead of ``OPTIONS``'."""
    parser.add_argument("--config", help="YAML file whose keys are these options (the command line overrides)")
    shown = {name: spec[1] for name, spec in OPTIONS.items()} | (shown_defaults or {})
    for name, (typ, _, _, _, help_) in OPTIONS.items():
        flag = f"--{name}"
        default = shown[name]
        d = f" (default: {default})" if default is not None else ""
        if name in hidden:
            help_, d = argparse.SUPPRESS, ""
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_ + d)
        elif typ is list:
            parser.add_argument(flag, nargs="+", default=None, metavar="NAME", help=help_)  # default in help_
        else:
            # Parsed as strings and converted in `validate`, so CLI and YAML values share one check and message.
            parser.add_argument(flag, default=None, metavar=name.upper(), help=help_ + d)


def _convert(name: str, value, typ):
    if value is None:
        return None
    if typ is bool:
        if isinstance(value, bool):
            return value
        quoted = " (unquoted: a quoted YAML value is a string)" if isinstance(value, str) else ""
        raise ConfigError(f"{name} must be true or false{quoted}, got {value!r}")
    if typ is list:
        vals = [value] if isinstance(value, str) else value
        if not isinstance(vals, (list, tuple)) or not vals or not all(isinstance(v, str) and v for v in vals):
            raise ConfigError(f"target_modules must be module names, a regex or 'all-linear', got {value!r}")
        return list(vals)
    if typ is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be {'an integer' if typ is int else 'a number'}, got {value!r}")
    try:
        if typ is int:
            if isinstance(value, int):
                return value
            text = str(value).strip()
            try:
                return int(text)  # exact, any size ("9007199254740993" must not round through a float)
            except ValueError:
                f = float(text)  # "1e3", "4.0" (YAML floats)
                if not f.is_integer():
                    raise
                return int(f)
        return float(value)
    except (TypeError, ValueError, OverflowError):
        kind = "an integer" if typ is int else "a number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}") from None


def validate(values: dict) -> argparse.Namespace:
    """Convert and check every option; fills defaults. Raises ``ConfigError`` naming the first bad option."""
    out = {}
    for name, (typ, default, check, needs, _) in OPTIONS.items():
        v = _convert(name, values.get(name), typ)
        if v is None:
            v = default
        elif check is not None and not check(v):
            raise ConfigError(f"{name} must be {needs}, got {values.get(name)!r}")
        out[name] = v
    if out["backend"] is None:  # the library's default, so that one setting reaches the CLI and the library alike
        from lora_fast.functional import default_backend

        try:
            out["backend"] = default_backend()
        except ValueError as e:
            raise ConfigError(f"{e} (it is --backend's default; pass --backend or fix the variable)") from None
    if out["fp16"] and out["bf16"]:
        raise ConfigError("choose one of fp16 and bf16, not both")
    if out["task"] == "classification" and out["base_dtype"] != "float32":
        raise ConfigError(f"base_dtype {out['base_dtype']}: --task classification trains its head whole, which "
                          "AdamW cannot update in a 16-bit dtype (NaN); keep --base_dtype float32")
    if out["save_total_limit"] is not None and out["save_steps"] is None:
        raise ConfigError("save_total_limit needs save_steps (it prunes the checkpoints save_steps writes)")
    if out["checkpoint_dir"] is not None and out["save_steps"] is None and out["resume_from_checkpoint"] is None:
        raise ConfigError("checkpoint_dir needs save_steps or resume_from_checkpoint (nothing else uses it)")
    out["target_modules"] = normalize_targets(out["target_modules"])
    out["config"] = values.get("config")
    return argparse.Namespace(**out)


def normalize_targets(values: list[str] | None):
    """CLI words → ``apply_lora``'s ``target_modules``: None, 'all-linear', one regex string, or a list of names."""
    if values is None:
        return None
    given = values
    # "c_attn,c_proj" (sweep's --target_sets spelling): module names never hold a comma, a regex's {1,2} may
    values = [p.strip() for v in values for p in ([v] if _REGEX_CHARS & set(v) else v.split(",")) if p.strip()]
    if not values:  # "--target_modules ," names none: refused now, not by apply_lora once the model has loaded
        raise ConfigError(f"target_modules must be module names, a regex or 'all-linear', got {given!r}")
    if len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS & set(values[0])):
        return values[0]
    if "all-linear" in values or any(_REGEX_CHARS & set(v) for v in values):
        raise ConfigError(f"target_modules: give either module names, or a single regex / 'all-linear', "
                          f"got {values!r}")
    return list(values)


def load_yaml(path: str, extra: tuple[str, ...] = ()) -> dict:
    """Read a YAML mapping of option names to values; unknown keys and non-mappings are errors. ``extra``: a
    command's own options beyond train's (the sweep's grid), known too."""
    import yaml

    p = Path(path).expanduser()  # --config=~/c.yaml: the shell leaves that ~ alone
    if p.is_dir():
        raise ConfigError(f"config file {path!r} is a directory; --config takes a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    class Loader(yaml.SafeLoader):  # a key given twice is an error, not "the last one wins" silently
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            twice = sorted({str(k) for k in keys if keys.count(k) > 1})
            if twice:
                raise ConfigError(f"config file {path!r} gives {twice} more than once")
            return super().construct_mapping(node, deep=deep)

    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must be a mapping of option: value, got {type(data).__name__}")
    names = [str(k).replace("-", "_") for k in data]
    twice = sorted({n for n in names if names.count(n) > 1})  # max-steps and max_steps
    if twice:
        raise ConfigError(f"config file {path!r} gives {twice} more than once")
    data = dict(zip(names, data.values(), strict=True))
    known = sorted({*OPTIONS, *extra})
    unknown = sorted(set(data) - set(known))
    if unknown:
        nested = " (config files do not include others)" if "config" in unknown else ""
        hints = [f"{u}: did you mean {m}?" for u in unknown if (m := suggestion(u, known))]
        raise ConfigError(f"config file {path!r}: unknown option(s) {unknown}{nested}"
                          f"{' (' + '; '.join(hints) + ')' if hints else ''}; known: {known}")
    return data


def resolve(ns: argparse.Namespace, extra: tuple[str, ...] = ()) -> argparse.Namespace:
    """Merge defaults < YAML (``ns.config``) < command line, then validate. ``extra``: a command's own options
    (the sweep's grid), each the command line's when given there (not None), else the file's, else None — set on
    the result unconverted (the command checks them)."""
    merged = load_yaml(ns.config, extra) if getattr(ns, "config", None) else {}
    own = {name: merged.pop(name, None) for name in extra}
    for name in OPTIONS:
        v = getattr(ns, name, None)
        if v is not None:
            merged[name] = v
    for a, b in (("fp16", "bf16"), ("bf16", "fp16")):  # one chosen on the command line wins over the file's other
        if getattr(ns, a, None) and getattr(ns, b, None) is None:
            merged[b] = False
    merged["config"] = getattr(ns, "config", None)
    opts = validate(merged)
    for name in extra:
        given = getattr(ns, name, None)
        setattr(opts, name, given if given is not None else own[name])
    return opts


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``lora-fast train`` arguments into a validated Namespace (raises ``ConfigError`` on bad values)."""
    parser = OptionParser(prog="lora-fast train", description="LoRA fine-tuning of GPT-2 style models")
    add_train_options(parser)
    return resolve(parser.parse_args(argv))
