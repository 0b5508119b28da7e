"""An adapter's PEFT-style ``adapter_config.json``: built on save, checked and resolved to target modules on load.

``save_adapter`` describes the model's LoRA layers with PEFT's ``LoraConfig`` fields (``_adapter_config``);
``load_adapter`` refuses configs it cannot honour (``_check_config``) and finds the modules PEFT would wrap
(``_peft_targets``). Per-module ranks and alphas go to ``rank_pattern``/``alpha_pattern``, matched as PEFT 0.21
does: a key is a regex that must match the end of the module name at a "." boundary, the first matching key wins
(``pattern_value``).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import torch.nn as nn

from lora_fast.inject import _resolve_targets, classifier_head_name, module_matches
from lora_fast.layer import LORA_BASE_TYPES

# LoraConfig fields that change what the adapter computes and that lora_fast does not implement.
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "layer_replication", "target_parameters",
                "trainable_token_indices", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                "velora_config", "monteclora_config", "kasa_config", "megatron_config")
# init_lora_weights values whose adapters only make sense on a base PEFT modifies when it loads them (PiSSA/OLoRA/
# CorDA subtract the adapter's initial components from W₀, LoftQ and LoRA-GA replace W₀): the trained A, B alone
# would be added to the unmodified base. (PEFT's converted adapters, saved with path_initial_model_for_weight_
# conversion, say init_lora_weights: true and load fine.) MiCA changes the computation itself.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
# PEFT 0.21.2's LoraConfig fields (dataclasses.fields). A field outside them that is set (not null/false/empty) is
# one lora_fast cannot know the meaning of — a newer PEFT's variant flag, say — and is warned about, as PEFT warns
# of keyword arguments its LoraConfig lacks
_KNOWN_FIELDS = frozenset((
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
    "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
    "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config",
    "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r",
    "rank_pattern", "revision", "runtime_config", "target_modules", "target_parameters", "task_type",
    "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config"))
_MAX_NAMED = 20  # keys listed in an error message before "... and N more"


def _names(keys, limit: int = _MAX_NAMED) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(str, keys[:limit])) + more


def pattern_value(patterns: dict, name: str, default):
    """PEFT 0.21's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", name)`` gives the value, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ----------------------------------------------------------------------------------------------------------- save
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # PEFT's


def _default_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for the model's transformers class (what ``AutoPeftModel`` needs to pick it again)."""
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    # a text encoder-decoder (T5, BART): PEFT's Seq2SeqLM class feeds input_ids, which Whisper (input_features)
    # does not take. Anything else stays None, PEFT's generic PeftModel, which runs every model's own forward
    # (its FeatureExtraction class would refuse CLIPModel's or a custom module's signature).
    if (getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            and getattr(model, "main_input_name", None) == "input_ids"
            and (cls.endswith("ForConditionalGeneration") or cls.endswith("ForSeq2SeqLM"))):
        return "SEQ_2_SEQ_LM"
    return None


def _candidate_names(model: nn.Module, lora_names) -> list[str]:
    """Module names as PEFT sees the base model: the modules inside a LinearWithLoRA do not exist there."""
    return [n for n, _ in model.named_modules() if n and not any(n.startswith(f"{w}.") for w in lora_names)]


def _target_modules_for(model: nn.Module, names: list[str], configured):
    """The first of (configured targets, module-name suffixes, exact names) that selects exactly ``names``."""
    candidates, wanted = _candidate_names(model, names), set(names)
    options = [] if configured is None or configured == "all-linear" else [configured]
    options += [sorted({n.rsplit(".", 1)[-1] for n in names}), "|".join(re.escape(n) for n in sorted(names))]
    for targets in options:
        targets = targets if isinstance(targets, str) else list(targets)
        if {n for n in candidates if module_matches(n, targets)} == wanted:
            return targets
    raise AssertionError("unreachable: the escaped alternation of exact names always matches")  # pragma: no cover


def _patterns(values: dict[str, float], default) -> dict:
    """{module: value} for the modules whose value differs from ``default``, checked against PEFT's lookup.

    The keys are the module names, as PEFT writes them, where PEFT's lookup (``pattern_value``) then gives every
    module its own value. Otherwise — a name that is a regex matching another name (``h.1.fc`` and ``h11.fc``), or
    a dot-bounded suffix of another (``proj`` and ``inner.proj``) — each key is ``^`` + the escaped name: in
    ``(.*\\.)?(^name)$`` the ``^`` holds only where the optional prefix is empty, so the key matches that full name
    alone."""
    pattern = {n: v for n, v in values.items() if v != default}
    if any(pattern_value(pattern, n, default) != v for n, v in values.items()):
        pattern = {"^" + re.escape(n): v for n, v in pattern.items()}
        wrong = [n for n, v in values.items() if pattern_value(pattern, n, default) != v]
        if wrong:  # pragma: no cover  (an anchored escaped name matches itself alone)
            raise AssertionError(f"save_adapter: no rank/alpha pattern keys select {wrong} alone")
    return pattern


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _auto_mapping(model: nn.Module) -> dict:
    """PEFT's ``auto_mapping``: the model's own class and its module. FSDP2's ``fully_shard`` swaps in a generated
    subclass (``FSDP<Name>``, defined in torch), which no loader can import: the class under it is named."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule

        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    except ImportError:  # pragma: no cover  (torch without distributed)
        pass
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def _adapter_config(model, layers, modules_to_save, base_model_name_or_path, task_type) -> dict:
    cfg = getattr(model, "lora_fast_config", None) or {}
    ranks = {n: m.lora.rank for n, m in layers.items()}
    alphas = {n: m.lora.alpha for n, m in layers.items()}
    r = cfg["rank"] if cfg.get("rank") in ranks.values() else Counter(ranks.values()).most_common(1)[0][0]
    alpha = cfg["alpha"] if cfg.get("alpha") in alphas.values() else Counter(alphas.values()).most_common(1)[0][0]
    rslora = {n: m.lora.use_rslora for n, m in layers.items()}
    if len(set(rslora.values())) > 1:
        raise ValueError("save_adapter: PEFT's format has one use_rslora for all layers, but these layers use "
                         f"rsLoRA and the others do not: {_names(n for n, v in rslora.items() if v)}")
    dropouts = Counter(m.lora.dropout for m in layers.values())
    dropout = dropouts.most_common(1)[0][0]
    if len(dropouts) > 1:
        warnings.warn(f"save_adapter: layers use different dropout probabilities {sorted(dropouts)}; PEFT's format "
                      f"has one lora_dropout, {dropout} is written (dropout does not change inference)", stacklevel=3)
    if base_model_name_or_path is None:
        base_model_name_or_path = (getattr(getattr(model, "config", None), "_name_or_path", None)
                                   or getattr(model, "name_or_path", None) or None)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": dropout,
        "use_rslora": next(iter(rslora.values())),
        "target_modules": _target_modules_for(model, list(layers), cfg.get("target_modules")),
        "rank_pattern": _patterns(ranks, r),
        "alpha_pattern": {k: _number(v) for k, v in _patterns(alphas, alpha).items()},
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,  # no "lora_bias" (False, PEFT's default): PEFT < 0.14's LoraConfig refuses that key
        # without a task type, PEFT's AutoPeftModel finds the base model's class here (PEFT writes it then too)
        "auto_mapping": None if task_type else _auto_mapping(model),
    }


# ----------------------------------------------------------------------------------------------------------- load
def _check_config(cfg: dict, where, who: str = "load_adapter") -> None:
    """Refuse a config lora_fast cannot honour, naming the field. ``who``: the caller the messages name —
    ``load_adapter`` (a file: the way out is PEFT's loader), or ``apply_lora`` (``config=``: PEFT's
    ``get_peft_model``)."""
    peft_way = ("load it with PEFT's PeftModel.from_pretrained" if who == "load_adapter"
                else "build it with PEFT's get_peft_model")
    fix = "; fix the file" if who == "load_adapter" else ""
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        spelled = (f"peft_type {kind!r} is not PEFT's spelling 'LORA' (PEFT's loader refuses it too){fix}"
                   if isinstance(kind, str) and kind.upper() == "LORA" else
                   f"peft_type {kind!r}: not a LoRA adapter; lora_fast loads LoRA adapters (peft_type 'LORA')")
        raise ValueError(f"{who}: {where}: {spelled}")
    task = cfg.get("task_type")  # kept by load_adapter and written again by save_adapter: must be one PEFT reads
    if task is not None and task not in TASK_TYPES:
        hint = (f" (PEFT's spelling is {task.upper()!r})" if isinstance(task, str) and task.upper() in TASK_TYPES
                else "")
        raise ValueError(f"{who}: {where}: task_type {task!r} is not one of PEFT's {list(TASK_TYPES)} (or "
                         f"null){hint}; PEFT's loader refuses it too (\"Invalid task type\"){fix}")
    bad = {f: cfg[f] for f in _UNSUPPORTED if cfg.get(f)}
    if str(cfg.get("init_lora_weights", "")).lower().startswith(_BASE_MODIFYING_INITS):
        bad["init_lora_weights"] = cfg["init_lora_weights"]
    if cfg.get("bias", "none") != "none":
        bad["bias"] = cfg["bias"]
    if bad:
        raise ValueError(f"{who}: {where} uses {bad}, which lora_fast does not implement; {peft_way} "
                         "instead")
    unknown = {k: v for k, v in cfg.items() if k not in _KNOWN_FIELDS and v not in (None, False, 0, "", [], {})}
    if unknown:
        version = f" (written by PEFT {cfg['peft_version']})" if cfg.get("peft_version") else ""
        warnings.warn(f"{who}: {where}{version} sets fields lora_fast does not know, ignored: "
                      f"{_names(f'{k}={v!r}' for k, v in unknown.items())}. If one changes what the adapter "
                      f"computes, the outputs differ from PEFT's; {peft_way} to be sure", stacklevel=4)
    _check_field_types(cfg, where, who)
    # PEFT's LoraConfig refuses these (a regex names its modules whole; a layer pattern needs the indices): taking
    # them would mean ignoring a field that says which modules to adapt, i.e. wrapping other modules than PEFT
    if isinstance(cfg.get("target_modules"), str):
        given = [f for f in ("layers_to_transform", "layers_pattern") if cfg.get(f) not in (None, [], "")]
        if given:
            raise ValueError(f"{who}: {where}: {' and '.join(given)} cannot be used when target_modules is a "
                             f"string ({cfg['target_modules']!r}: a regex or 'all-linear'), as in PEFT's LoraConfig; "
                             "give target_modules as a list of names")
    if cfg.get("layers_pattern") and cfg.get("layers_to_transform") is None:
        raise ValueError(f"{who}: {where}: layers_pattern {cfg['layers_pattern']!r} needs layers_to_transform "
                         "(the layer indices it selects), as in PEFT's LoraConfig")
    ranks = {"r": cfg.get("r"), **{f"rank_pattern[{k!r}]": v for k, v in (cfg.get("rank_pattern") or {}).items()}}
    alphas = {"lora_alpha": cfg.get("lora_alpha"),
              **{f"alpha_pattern[{k!r}]": v for k, v in (cfg.get("alpha_pattern") or {}).items()}}
    for field, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{who}: {where}: {field} must be a positive int, got {r!r}")
    for field, alpha in alphas.items():
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ValueError(f"{who}: {where}: {field} must be a positive number, got {alpha!r}")
    p = cfg.get("lora_dropout", 0.0) or 0.0
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{who}: {where}: lora_dropout must be in [0, 1), got {p!r}")


def _is_names(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) and x for x in v)


def _check_field_types(cfg: dict, where, who: str = "load_adapter") -> None:
    """The fields that select modules have the types PEFT's LoraConfig documents, and their regexes compile: a
    string where a list belongs would be read letter by letter (``modules_to_save: "lm_head"`` leaves out every
    module whose name holds an ``h``), and a bad regex would fail later without naming the field."""
    def bad(field, needs):
        raise ValueError(f"{who}: {where}: {field} must be {needs}, got {cfg[field]!r}")

    def compiles(field, pattern, shown):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{who}: {where}: {shown} is not a valid regular expression ({e})") from None

    for field in ("target_modules", "exclude_modules"):
        v = cfg.get(field)
        if v is not None and not (isinstance(v, str) or _is_names(v)):
            bad(field, "a regex string or a list of module names")
        if isinstance(v, str):
            compiles(field, v, f"{field} {v!r}")
    if cfg.get("modules_to_save") is not None and not _is_names(cfg["modules_to_save"]):
        bad("modules_to_save", "a list of module names")
    v = cfg.get("layers_to_transform")
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, list)
                              and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        bad("layers_to_transform", "a layer index or a list of layer indices")
    v = cfg.get("layers_pattern")
    if v is not None and not (isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)):
        bad("layers_pattern", "a string or a list of strings")
    v = cfg.get("use_rslora")  # JSON "false" is a true string: α/√r in place of α/r, silently
    if v is not None and not isinstance(v, bool):
        bad("use_rslora", "true or false")
    for field in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(field)
        if v is not None and not isinstance(v, dict):
            bad(field, "a mapping of module-name patterns to values")
        for key in v or {}:
            compiles(field, key, f"{field} key {key!r}")


def _peft_targets(model: nn.Module, cfg: dict) -> list[str]:
    """Module names PEFT would wrap for this config (its ``check_target_module_exists`` rules: exclude_modules,
    modules_to_save, target_modules as a full-match regex or names/suffixes, layers_to_transform/layers_pattern)."""
    targets = _resolve_targets(model, cfg.get("target_modules"))
    if targets == "all-linear":
        targets = "|".join(re.escape(n) for n in _all_linear(model, cfg.get("task_type")))
    exclude, to_save = cfg.get("exclude_modules"), cfg.get("modules_to_save") or []
    layers_idx, layers_pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if isinstance(layers_idx, int):
        layers_idx = [layers_idx]
    if isinstance(layers_pattern, str):  # "" (like None and []) means any layer, as in PEFT
        layers_pattern = [layers_pattern] if layers_pattern else None
    found = []
    for name, _ in model.named_modules():
        if not name or (exclude and module_matches(name, exclude)):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in to_save) or not module_matches(name, targets):
            continue
        # An entry equal to the full name selects the module whatever its layer (PEFT: ``key in target_modules``);
        # a suffix match is filtered by layer: the first numbered segment is the layer index.
        if layers_idx and not isinstance(targets, str) and name not in targets:
            pats = ([rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in layers_pattern] if layers_pattern
                    else [r".*?\.[^.]*\.(?P<idx>\d+)\."])
            idx = next((m.group("idx") for p in pats if (m := re.match(p, name))), None)
            if idx is None or int(idx) not in layers_idx:
                continue
        found.append(name)
    return found


def _all_linear(model: nn.Module, task_type: str | None) -> list[str]:
    """PEFT's "all-linear": every Linear/Conv1D but the output embeddings, or, for a model without them and
    ``task_type`` SEQ_CLS, but the classification head (and what is inside it, saved whole then)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = classifier_head_name(model) if out is None and task_type == "SEQ_CLS" else None
    return [n for n, m in model.named_modules() if isinstance(m, LORA_BASE_TYPES) and m is not out
            and not (head and (n == head or n.startswith(f"{head}.")))]
