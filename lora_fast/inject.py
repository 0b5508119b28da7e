"""Model injection: put ``LinearWithLoRA`` around matching projections of any model, and take it off again.

Matching follows PEFT's ``target_modules`` rules, so a PEFT config carries over unchanged:
    list/tuple/set  a module matches when its full name equals an entry or ends with "." + entry;
    str             a regular expression matched (``re.fullmatch``) against the full module name;
    "all-linear"    every nn.Linear / Conv1D except the output embedding (``lm_head``) and, on a
                    ``*ForSequenceClassification`` model, its head (``score``/``classifier``) and anything
                    inside it, as PEFT with ``task_type="SEQ_CLS"``; MoE routers written as Linear subclasses
                    (``_is_router``) are left out too, with a warning;
    None            a per-architecture default (``DEFAULT_TARGET_MODULES``, e.g. ``c_attn`` for GPT-2).
Unlike the tutorials' ``isinstance(module, nn.Linear)`` loop (which silently changes nothing on GPT-2, whose
projections are Conv1D), a target that matches nothing is an error listing the candidates.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import re
import warnings
from collections.abc import Iterable

import torch.nn as nn

from lora_fast.checkpointing import watch_checkpointing
from lora_fast.layer import LORA_BASE_TYPES, LinearWithLoRA, _check_hparams
from lora_fast.module_names import plain_name, wrapper_inner

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (0.21: every architecture it lists; distilbert: ours).
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "mt5": ["q", "v"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # a regex, as in PEFT
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def _output_embedding_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(unwrap_model(model), "get_output_embeddings", None)  # DDP does not forward it
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
    return names


SEQ_CLS_HEAD_NAMES = ("classifier", "score")  # PEFT adds these to a SEQ_CLS adapter's modules_to_save
# PEFT's PeftModelFor{SequenceClassification,TokenClassification,QuestionAnswering} add these module names to
# modules_to_save (peft_model.py, 0.21): their heads are saved whole with the adapter and expected when loading.
TASK_HEAD_NAMES = {"SEQ_CLS": SEQ_CLS_HEAD_NAMES, "TOKEN_CLS": SEQ_CLS_HEAD_NAMES, "QUESTION_ANS": ("qa_outputs",)}


def _head_of(model: nn.Module, names) -> str | None:
    """The first of ``names`` that is a direct child module of ``model``."""
    return next((n for n in names if isinstance(getattr(model, n, None), nn.Module)), None)


def _inner_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """(the model inside torch.compile / DDP wrappers, the prefix its module names have in ``model``: "" or
    "_orig_mod.", "module.", ...)."""
    inner = unwrap_model(model)
    if inner is model:
        return model, ""
    return inner, next(f"{n}." for n, m in model.named_modules() if m is inner)


def classifier_head_name(model: nn.Module) -> str | None:
    """The sequence-classification head PEFT leaves out of "all-linear" (``classifier`` or ``score``), named as in
    ``model`` (a compiled or DDP-wrapped model's class is the wrapper's: the model inside decides)."""
    inner, prefix = _inner_and_prefix(model)
    if not type(inner).__name__.endswith("ForSequenceClassification"):
        return None
    head = _head_of(inner, SEQ_CLS_HEAD_NAMES)
    return prefix + head if head else None


def _resolve_targets(model: nn.Module, target_modules):
    if target_modules is None:  # the model's own type, through DDP / DataParallel / compile wrappers
        model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"no default target_modules for model_type={model_type!r}; pass target_modules= (names, a regex, "
                "or 'all-linear')"
            )
        default = DEFAULT_TARGET_MODULES[model_type]
        return default if isinstance(default, str) else list(default)
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return "all-linear"
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from None
        return target_modules
    if isinstance(target_modules, Iterable):
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules must be non-empty names, a regex string or 'all-linear', "
                             f"got {target_modules!r}")
        return targets
    raise TypeError(f"target_modules must be a list of names, a regex string or 'all-linear', got {target_modules!r}")


def module_matches(name: str, targets) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches equal names or '.'-suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def multihead_out_projs(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` of every nn.MultiheadAttention: it reads their weight and bias directly
    (F.multi_head_attention_forward), never calling them, so a LoRA wrapper there would never run."""
    return {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _inside_saved(name: str, entries) -> bool:
    """PEFT's rule (``check_target_module_exists``): a module equal to, or inside, a module that a
    ``modules_to_save`` entry names (the entry as whole '.'-separated segments of the name) is no LoRA target."""
    return any(re.match(rf"(^|.*\.){re.escape(e)}($|\..*)", name) for e in entries)


def is_peft_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of PEFT's tuner layers (a ``base_layer`` wrapper), patched by ``patch_peft`` too: that
    swaps in a class of lora_fast's (``lora_fast.peft_compat``) derived from PEFT's, so its own module is not PEFT's."""
    return hasattr(module, "base_layer") and any(c.__module__.startswith("peft.") for c in type(module).__mro__)


def find_target_modules(model: nn.Module, target_modules=None, modules_to_save=None) -> list[str]:
    """Full names of the modules that ``apply_lora`` would wrap (already-wrapped ones included).

    As in PEFT, a matched module inside a ``modules_to_save`` module (RoBERTa's ``classifier.dense`` for a
    ``"dense"`` target when the classifier is trained whole) is left out, with a warning; one named in full in a
    list stays (``apply_lora`` then refuses the clash).

    Raises:
        ValueError: nothing matches (the message names the targets and lists candidate module names), or a
            matching module is neither nn.Linear nor Conv1D.
    """
    if any(is_peft_layer(m) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already holds PEFT LoRA layers: lora_fast would nest adapters "
                         "inside PEFT's. Use lora_fast.patch_peft(model) to run PEFT's layers through lora_fast, or "
                         "apply_lora on the base model")
    targets = _resolve_targets(model, target_modules)
    all_linear = targets == "all-linear"
    skip = _output_embedding_names(model) | {classifier_head_name(model)} if all_linear else set()
    wrapped_inner = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)
                     for c, _ in m.named_modules() if c}
    # MHA out_proj modules: left out with a warning (an error when named in full or when nothing else matches)
    mha_out = multihead_out_projs(model)
    saved = [modules_to_save] if isinstance(modules_to_save, str) else \
        list(modules_to_save) if isinstance(modules_to_save, Iterable) else []
    saved = [e for e in saved if isinstance(e, str) and e]  # bad entries: apply_lora's _resolve_modules_to_save
    found, candidates, skipped, in_saved, routers = [], [], [], [], []
    for name, module in model.named_modules():
        if not name or name in wrapped_inner:
            continue
        is_base = isinstance(module, (LinearWithLoRA,) + LORA_BASE_TYPES) and name not in mha_out
        if is_base:
            candidates.append(name)
        if all_linear:
            if is_base and _is_router(module):
                routers.append(name)
                continue
            if is_base and name not in skip and not any(name.startswith(f"{h}.") for h in skip if h):
                if saved and _inside_saved(name, saved):
                    in_saved.append(name)
                    continue
                found.append(name)  # nothing inside a skipped head either (RoBERTa's classifier.dense/.out_proj)
        elif module_matches(name, targets):
            if name in mha_out:
                skipped.append(name)
                continue
            if saved and _inside_saved(name, saved) and not (isinstance(targets, list) and name in targets):
                in_saved.append(name)
                continue
            if not is_base:
                raise ValueError(
                    f"target module {name!r} matches {targets!r} but is a {type(module).__name__}; lora_fast "
                    "supports nn.Linear and transformers' Conv1D"
                )
            found.append(name)
    if skipped:
        why = (f"{_mha_names(skipped)} the out_proj of an nn.MultiheadAttention, which reads its weight directly "
               "and never calls it: a LoRA adapter there would change nothing")
        named = isinstance(targets, (list, tuple, set)) and any(n in targets for n in skipped)
        if named or not found:
            raise ValueError(f"target module {why}. Target other modules (or a model whose attention calls its "
                             "projections)")
        warnings.warn(f"apply_lora: left out {why}", stacklevel=3)
    if in_saved:
        msg = (f"{len(in_saved)} module(s) matching target_modules inside modules_to_save {saved}, which are "
               f"trained whole: {', '.join(in_saved[:6])}{', ...' if len(in_saved) > 6 else ''}")
        if not found:
            raise ValueError(f"target_modules {targets!r}: every match lies inside modules_to_save ({msg}); "
                             "target modules outside them")
        warnings.warn(f"apply_lora: left out {msg} (as PEFT does)", stacklevel=3)
    if not found:
        suffixes = sorted({c.rsplit(".", 1)[-1] for c in candidates})
        hint = (f". A string is a regular expression matched against the full module name (as in PEFT); for the "
                f"modules named {targets!r} pass a list, [{targets!r}]"
                if isinstance(targets, str) and any(module_matches(c, [targets]) for c in candidates) else "")
        raise ValueError(
            f"target_modules {targets!r} matched no module of {type(model).__name__}. Linear/Conv1D modules that "
            f"could be targeted: {suffixes} (e.g. {candidates[:4]}){hint}"
        )
    if all_linear:
        _warn_plain_projections(model, skip, routers)
    if isinstance(targets, list):  # PEFT drops a dead entry silently; a typo ("c_prj") deserves a word
        dead = [t for t in targets if not any(module_matches(n, [t]) for n in found)]
        if dead:
            warnings.warn(f"apply_lora: target_modules {dead} matched no module of {type(model).__name__} (the "
                          f"other entries matched {len(found)} modules, which are wrapped)", stacklevel=3)
    return found


_MAX_LISTED = 8  # modules named in the all-linear warning before "... and N more"


def _is_router(module: nn.Module) -> bool:
    """A MoE router written as an nn.Linear subclass whose forward returns routing scores, not a projection's
    output (transformers' ``Llama4Router``, ``PhimoeTopKRouter``: tuples). "all-linear" leaves it out, named in its
    warning: PEFT's wraps it, and the model's first forward fails. Named in ``target_modules``, it is wrapped (and
    ``LinearWithLoRA`` says at the first forward that its base returns a tuple)."""
    return (isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward
            and "router" in type(module).__name__.lower())


def _warn_plain_projections(model: nn.Module, skip: set, routers: list[str]) -> None:
    """Say which modules "all-linear" cannot wrap although PEFT adapts them: modules other than Linear/Conv1D
    (and embeddings, convolutions) that hold a ≥2-D floating-point parameter named like a projection (``weight``,
    ``*_proj``). These are transformers v5's fused MoE experts (``gate_up_proj``/``down_proj`` of shape (experts,
    ..., ...)) and routers (a custom module with a ``weight``), which PEFT 0.21's "all-linear" adapts through
    ``target_parameters``: without a word, a ported adapter would silently train fewer modules. The routers that
    are Linear subclasses (``_is_router``), left out as well, are named too."""
    if routers:
        listed = ", ".join(map(repr, routers[:_MAX_LISTED]))
        more = f" ... and {len(routers) - _MAX_LISTED} more" if len(routers) > _MAX_LISTED else ""
        warnings.warn(f"apply_lora: 'all-linear' leaves out the MoE router(s) {listed}{more}: nn.Linear subclasses "
                      "whose forward returns routing scores (a tuple), not a projection, where PEFT's all-linear "
                      "wraps them and the first forward fails", stacklevel=4)
    plain = (nn.Embedding, nn.modules.conv._ConvNd, LinearWithLoRA) + LORA_BASE_TYPES
    found = []
    for name, module in model.named_modules():
        if (not name or isinstance(module, plain) or any(name == h or name.startswith(f"{h}.") for h in skip if h)
                or any(name.startswith(f"{w}.") for w, _ in found)):
            continue
        leaves = [leaf for leaf, p in module.named_parameters(recurse=False)
                  if p.dim() >= 2 and p.is_floating_point() and (leaf == "weight" or leaf.endswith("_proj"))]
        if leaves:
            found.append((name, leaves))
    if not found:
        return
    listed = ", ".join(f"{n!r} ({', '.join(leaves)})" for n, leaves in found[:_MAX_LISTED])
    more = f" ... and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
    warnings.warn(f"apply_lora: 'all-linear' wraps nn.Linear and Conv1D modules only; {listed}{more} hold projection "
                  "weights as plain parameters (fused MoE experts, routers) and get no adapter, where PEFT's "
                  "all-linear adapts them through target_parameters (which lora_fast does not implement)",
                  stacklevel=4)


def _mha_names(names: list[str]) -> str:
    return (f"{names[0]!r} is" if len(names) == 1 else f"{', '.join(map(repr, names))} are")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:  # setattr(model, "", new) would register a child with an empty name, silently
        raise ValueError("cannot replace the root module in place; use the returned module instead")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(
    model: nn.Module,
    target_modules=None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    backend: str | None = None,
    modules_to_save=None,
    *,
    config=None,
    _plan: dict[str, tuple[int, float]] | None = None,
) -> nn.Module:
    """Wrap matching Linear/Conv1D modules of ``model`` in ``LinearWithLoRA`` (in place) and freeze the rest.

    Args:
        model: any nn.Module (a transformers model, typically).
        target_modules: names, a regex, "all-linear", or None for the architecture's default (see module doc;
            PEFT's table, and DistilBERT's q_lin/v_lin, which PEFT lacks).
        rank, alpha, dropout, use_rslora: the adapter's hyper-parameters (see ``LoRALayer``).
        backend: forwarded to every layer (None reads ``LORA_FAST_BACKEND``).
        modules_to_save: names of modules trained whole beside the adapter (a classification head), matched as
            PEFT's ``LoraConfig.modules_to_save``: every module whose name ends with an entry, outermost only.
            ``save_adapter`` stores them with the adapter. A weight they share with the rest of the model (an
            ``lm_head`` tied to the input embeddings) is untied first, with a warning, as PEFT trains a copy.
            Those of an earlier ``apply_lora``/``load_adapter`` call stay part of the adapter.
        config: a PEFT ``LoraConfig`` (or a dict of its fields), instead of the arguments above: the adapter
            ``get_peft_model(model, config)`` builds, ``rank_pattern``/``alpha_pattern``, ``exclude_modules``,
            ``layers_to_transform`` and ``task_type``'s head included (``adapter.apply_config``); the model must
            have no LoRA layers yet.
        _plan: {module name: (rank, alpha)} for targets taking other values than ``rank``/``alpha`` (internal:
            ``config``'s ``rank_pattern``/``alpha_pattern``).

    Returns:
        The same model. Only LoRA parameters (and ``modules_to_save``) require grad afterwards. Modules already
        wrapped are left as they are (applying twice never nests wrappers). The new layers are in training mode,
        whatever the model's (``from_pretrained`` returns one in eval mode), as PEFT's ``get_peft_model`` leaves
        its layers: a loop that never calls ``model.train()`` gets the LoRA dropout PEFT gives it, and
        ``model.eval()`` / ``model.train()`` set every layer as usual.

    Raises:
        ValueError: bad hyper-parameters, targets matching nothing, ``modules_to_save`` entries all matching
            nothing (one matching nothing beside others is a warning, as for targets) or one naming a LoRA target
            (or a module holding one). The model is unchanged then.
    """
    if config is not None:
        given = [k for k, v, d in (("target_modules", target_modules, None), ("rank", rank, 8), ("alpha", alpha, 16.0),
                                   ("dropout", dropout, 0.0), ("use_rslora", use_rslora, False),
                                   ("modules_to_save", modules_to_save, None)) if v != d]
        if given:
            raise TypeError(f"apply_lora: config describes the adapter; {', '.join(given)} given beside it would be "
                            "ignored: set them in the config")
        from lora_fast.adapter import apply_config  # adapter imports this module

        return apply_config(model, config, backend)
    rank, alpha, dropout = _check_hparams(rank, alpha, dropout)
    plan = {n: _check_hparams(r, a, dropout)[:2] for n, (r, a) in (_plan or {}).items()}
    if isinstance(modules_to_save, Iterable) and not isinstance(modules_to_save, str):
        modules_to_save = list(modules_to_save)  # read twice below (a generator would be empty the second time)
    if isinstance(target_modules, Iterable) and not isinstance(target_modules, str):
        target_modules = list(target_modules)  # matched, then recorded in lora_fast_config: an iterator is read once
    names = find_target_modules(model, target_modules, modules_to_save)
    existing = [n for n in lora_layers(model) if n not in names]  # wrapped by an earlier call, not targeted now
    extras = _resolve_modules_to_save(model, names + existing, modules_to_save)
    raw = {plain_name(n): n for n, _ in model.named_modules()}  # recorded names are plain (module_names)
    earlier = [raw[e] for e in modules_saved_whole(model) if e in raw and raw[e] not in extras]
    _check_no_clash(earlier, names, " (of an earlier apply_lora/load_adapter call)")  # they stay: nothing inside
    extras += earlier
    new, grads = {}, {}  # every wrapper is built (and every base checked) before the model is touched
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LinearWithLoRA):
            if module.merged:  # it would run the base alone: its LoRA weights, made trainable below, get no gradient
                raise ValueError(f"apply_lora: {name} is merged (ΔW folded into its base weight), so training its "
                                 "adapter would change nothing; unmerge first (lora_fast.unmerge_lora(model))")
            lora = module.lora
            if (lora.rank, lora.alpha, lora.dropout, lora.use_rslora) != (rank, float(alpha), float(dropout),
                                                                          bool(use_rslora)):
                warnings.warn(
                    f"apply_lora: {name} already has a LoRA adapter (rank={lora.rank}, alpha={lora.alpha:g}, "
                    f"dropout={lora.dropout:g}); it is kept as is, not re-created with rank={rank}, alpha={alpha:g}, "
                    f"dropout={dropout:g}", stacklevel=2)
            continue
        r, a = plan.get(name, (rank, alpha))
        grads[name] = [(p, p.requires_grad) for p in module.parameters()]
        try:
            wrapped = LinearWithLoRA(module, rank=r, alpha=a, dropout=dropout, use_rslora=use_rslora,
                                     backend=backend)
        except (TypeError, ValueError) as e:  # a quantised or offloaded base: which of the targets it is
            for p, flag in itertools.chain.from_iterable(grads.values()):  # the bases wrapped so far were frozen
                p.requires_grad_(flag)
            raise type(e)(f"apply_lora: {name}: {e}") from e
        new[name] = wrapped.train()  # as PEFT's get_peft_model leaves its new layers, whatever the model's mode
    check_trainable_before_wrap(distributed_wrapper(model), "apply_lora", len(new), itertools.chain(
        (p for m in lora_layers(model).values() for p in m.lora.parameters()),
        (p for e in extras for p in model.get_submodule(e).parameters())))
    _warn_tied(model, new)
    for name, wrapped in new.items():
        _set_submodule(model, name, wrapped)
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora.lora_" in f".{pname}")
    _warn_frozen_head(model, names, extras)
    if extras:
        from lora_fast.adapter import _untie_extras

        _untie_extras(model, extras, who="apply_lora")
        for owner in extras:
            model.get_submodule(owner).requires_grad_(True)
    model.lora_fast_config = {
        "target_modules": target_modules if isinstance(target_modules, str) or target_modules is None
        else list(target_modules),
        "rank": rank, "alpha": float(alpha), "dropout": float(dropout), "use_rslora": bool(use_rslora),
        "modules_to_save": [plain_name(e) for e in extras],
    }
    prepare_for_checkpointing(model)
    return model


def prepare_for_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing, now or switched on later, leaves no LoRA weight without its gradient
    (``lora_fast.checkpointing``; PEFT's ``get_peft_model`` covers only checkpointing already on)."""
    watch_checkpointing(unwrap_model(model))


def _warn_frozen_head(model: nn.Module, lora_names, extras) -> None:
    """A task head (``TASK_HEAD_NAMES`` of the model's task type) left without anything trainable keeps its
    current, usually random, weights: say so once, and how PEFT users get it trained (their task_type adds it)."""
    from lora_fast.adapter_config import _default_task_type

    inner, prefix = _inner_and_prefix(model)
    task = _default_task_type(inner)
    head = _head_of(inner, TASK_HEAD_NAMES.get(task, ()))
    if head is None:
        return
    head = prefix + head
    if any(e == head or e.startswith(f"{head}.") or head.startswith(f"{e}.") for e in extras):
        return
    inside = [n for n in lora_names if n == head or n.startswith(f"{head}.")]
    if inside and task == "SEQ_CLS":  # save_adapter refuses it: PEFT saves a SEQ_CLS head whole
        warnings.warn(f"apply_lora: LoRA layer(s) {inside} sit in {type(inner).__name__}'s head {head!r}, whose other "
                      f"weights stay frozen at their current (usually random) values, and save_adapter will refuse "
                      f"them (PEFT saves a SEQ_CLS head whole); pass modules_to_save=[{head.rsplit('.', 1)[-1]!r}] "
                      "to train the head whole (targets inside it are then left out, as PEFT does)", stacklevel=3)
    elif not inside:
        warnings.warn(f"apply_lora: {type(model).__name__}'s head {head!r} stays frozen at its current weights "
                      f"(random, unless the checkpoint was trained for this task); pass modules_to_save=[{head!r}] "
                      f"to train it with the adapter, as PEFT's task_type={task!r} does", stacklevel=3)


def _resolve_modules_to_save(model: nn.Module, lora_names: list[str], entries) -> list[str]:
    """The modules ``modules_to_save`` selects (PEFT's suffix rule), checked before the model is touched."""
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    entries = list(entries) if isinstance(entries, Iterable) else entries
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise TypeError(f"modules_to_save must be a list of module names, got {entries!r}")
    from lora_fast.adapter import _modules_to_save
    from lora_fast.adapter_config import _candidate_names

    extras = _modules_to_save(model, lora_names, entries)
    dead = [e for e in entries if not any(n.endswith(e) for n in _candidate_names(model, lora_names))]
    if dead and len(dead) == len(entries):
        raise ValueError(f"modules_to_save {dead} matched no module of {type(model).__name__} (an entry selects "
                         "every module whose name ends with it)")
    if dead:  # as target_modules: PEFT's SEQ_CLS list ["classifier", "score"] names one head per architecture
        warnings.warn(f"apply_lora: modules_to_save {dead} matched no module of {type(model).__name__} (the other "
                      f"entries matched {extras}, which are trained whole)", stacklevel=3)
    _check_no_clash(extras, lora_names)
    return extras


def _check_no_clash(extras: list[str], lora_names: list[str], whose: str = "") -> None:
    """A module trained whole (``modules_to_save``) must not be, or hold, a LoRA target: its base weights would be
    trained too (``requires_grad_`` on the whole module) and PEFT could not load the adapter."""
    clash = [f"{e!r} (LoRA target {n!r})" for e in extras for n in lora_names if n == e or n.startswith(f"{e}.")]
    if clash:
        raise ValueError(f"modules_to_save{whose} {', '.join(clash)}: a module trained whole cannot also hold a LoRA "
                         "adapter (PEFT could not load it); leave it out of target_modules or of modules_to_save")


def names_by_id(named) -> dict[int, list[str]]:
    """{id(object): every name it has} from ``(name, object)`` pairs, e.g. ``named_modules(remove_duplicate=False)``."""
    names_of: dict[int, list[str]] = {}
    for name, obj in named:
        names_of.setdefault(id(obj), []).append(name)
    return names_of


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): every name it has in ``model``}: tied parameters have several."""
    return names_by_id(model.named_parameters(remove_duplicate=False))


def untied_embeddings(model: nn.Module):
    """(inner model, input embeddings, output embeddings) when ``model`` (after ``unwrap_model``) has both and they
    no longer share a weight; else None (not a transformers model, no embeddings, or still tied)."""
    inner = unwrap_model(model)
    try:
        inp, out = inner.get_input_embeddings(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without embeddings
        return None
    if inp is None or out is None or getattr(out, "weight", None) is getattr(inp, "weight", None):
        return None
    return inner, inp, out


def untie_embeddings_in_config(model: nn.Module) -> str:
    """After an untie: when the model's output embeddings no longer share the input embeddings' weight, set
    ``tie_word_embeddings`` to False in its config (and its text config), so that transformers does not tie them
    again — ``tie_weights()`` (``resize_token_embeddings`` calls it) and ``from_pretrained`` of the saved model
    would put one weight in place of the other.

    Not where the model's ``forward`` reads the flag (``tie_reading_classes``: SwitchTransformers, UDOP, UMT5 before
    transformers 5.24 and T5 before 5 scale the decoder output by d_model**-0.5 when it is set): clearing it there would
    change the logits by a factor √d_model. The flag stays; ``save_pretrained`` still writes both weights (it drops only
    tensors that share storage), and transformers ≥ 5's ``from_pretrained`` does not tie two saved weights that differ;
    ``merge_and_unload`` moves the scale into the head where the config keeps a cleared flag
    (``merge._fold_decoder_scale``: transformers 4). Returns what was done, for the caller's warning ("" when
    nothing)."""
    found = untied_embeddings(model)
    if found is None:
        return ""
    inner, _inp, out = found
    config = getattr(inner, "config", None)
    configs = [config]
    with contextlib.suppress(AttributeError, ValueError):  # a composite model's text part (several: ambiguous)
        configs.append(config.get_text_config(decoder=True))
    configs = [c for c in configs if getattr(c, "tie_word_embeddings", False)]
    if not configs:
        return ""
    readers = tie_reading_classes(inner)
    if readers:
        return (f"tie_word_embeddings left True: {', '.join(readers)} scales the decoder output by it, so clearing "
                "it would change the logits; save_pretrained keeps both weights and from_pretrained (transformers "
                ">= 5) does not tie them again, but tie_weights() and resize_token_embeddings() would")
    others = ties_lost_with_flag(inner, configs, out)
    if others:
        return (f"tie_word_embeddings left True: it also ties {', '.join(others)} in this transformers version, so "
                "clearing it would make from_pretrained of the saved model load those at random; save_pretrained "
                "keeps both head and embeddings and from_pretrained does not tie two saved weights that differ, "
                "but tie_weights() and resize_token_embeddings() would")
    for c in configs:
        c.tie_word_embeddings = False
    inner.__dict__[CLEARED_TIE] = True  # merge_and_unload then copies the ties that only the flag made (transformers 4)
    return "tie_word_embeddings set to False in the model's config, so that transformers does not tie them again"


def ties_lost_with_flag(inner: nn.Module, configs, out: nn.Module) -> list[str]:
    """The tied parameters other than the output embeddings' that transformers would stop tying if
    ``tie_word_embeddings`` were cleared in ``configs`` (transformers 5's ``get_expanded_tied_weights_keys`` returns
    nothing when the flag is off: BART's, and UMT5's from 5.0 to 5.23, encoder/decoder ``embed_tokens`` ->
    ``shared``).
    save_pretrained writes such a weight once, so with the flag cleared the reloaded model gets it at random."""
    get = getattr(inner, "get_expanded_tied_weights_keys", None)
    if get is None:  # transformers 4 has no such map: merge_and_unload copies those ties (merge._copy_flag_ties)
        return []
    config = getattr(inner, "config", None)
    try:  # a config that loads the flag True again (transformers 5's T5) ties everything back: nothing lost
        if type(config).from_dict({**config.to_dict(), "tie_word_embeddings": False}).tie_word_embeddings:
            return []
    except Exception:  # noqa: BLE001
        pass
    head = tuple(f"{n}." for n, m in inner.named_modules(remove_duplicate=False) if m is out)  # a LoRA one too
    saved = [c.tie_word_embeddings for c in configs]
    try:
        before = dict(get(all_submodels=True))
        for c in configs:
            c.tie_word_embeddings = False
        after = get(all_submodels=True)
    except Exception:  # noqa: BLE001  (an API that differs: keep the previous behaviour)
        return []
    finally:
        for c, v in zip(configs, saved, strict=True):
            c.tie_word_embeddings = v
    modules = dict(inner.named_modules(remove_duplicate=False))

    def owner(name):
        return modules.get(name.rpartition(".")[0])

    # one module under two names (T5's encoder.embed_tokens is its shared) stays one whatever the flag says
    return sorted(k for k, v in before.items() if k not in after and not k.startswith(head)
                  and (owner(k) is None or owner(k) is not owner(v)))


_TIE_FLAG_READ = re.compile(r"config\.tie_word_embeddings\b")
CLEARED_TIE = "_lora_fast_cleared_tie_flag"  # on a model whose tie_word_embeddings lora_fast set to False


def tie_reading_classes(model: nn.Module) -> list[str]:
    """The classes in ``model`` whose ``forward`` reads ``config.tie_word_embeddings`` (for numbers, not for
    tying): ``Cls.forward`` names, sorted. A class whose source cannot be read counts as not reading it."""
    return sorted({f"{type(m).__name__}.forward" for m in model.modules() if _forward_reads_tie_flag(type(m))})


@functools.cache
def _forward_reads_tie_flag(cls: type) -> bool:
    if cls.forward is nn.Module.forward or not hasattr(cls, "config_class"):  # transformers models only
        return False
    try:
        return bool(_TIE_FLAG_READ.search(inspect.getsource(cls.forward)))
    except (OSError, TypeError):
        return False


def tied_names(names_of: dict[int, list[str]], name: str, weight: nn.Parameter) -> list[str]:
    """The names ``weight`` (module ``name``'s base weight) also has outside that module: its tied partners."""
    return [n for n in names_of.get(id(weight), []) if not n.startswith(f"{name}.")]


def _warn_tied(model: nn.Module, new: dict) -> None:
    """Warn when a targeted base weight is shared (tied embeddings): merging will untie it (merge._untie_bases)."""
    names_of = parameter_names(model)
    for name, wrapped in new.items():
        tied = tied_names(names_of, name, wrapped.linear.weight)
        if tied:
            warnings.warn(f"apply_lora: {name}.weight is tied to {tied}; merging this adapter (merge_lora, "
                          "merge_and_unload) will first give it a copy of its own (the tie is cut), so that ΔW "
                          "leaves those unchanged (the layer's own merge_weights() does not: like PEFT's layer "
                          "merge, it writes ΔW into the shared weight)", stacklevel=3)


def apply_lora_to_gpt2(model: nn.Module, rank: int = 8, alpha: float = 16.0, target_modules=None,
                       dropout: float = 0.0) -> nn.Module:
    """The tutorials' entry point for GPT-2: ``apply_lora`` with GPT-2's default target (``c_attn``)."""
    return apply_lora(model, target_modules=target_modules if target_modules is not None else ["c_attn"],
                      rank=rank, alpha=alpha, dropout=dropout)


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """Every ``LinearWithLoRA`` in the model, by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def modules_saved_whole(model: nn.Module) -> list[str]:
    """The ``modules_to_save`` that ``apply_lora`` / ``load_adapter`` recorded in ``model.lora_fast_config`` (trained
    in place), [] when none."""
    cfg = getattr(model, "lora_fast_config", None)
    return list(cfg.get("modules_to_save") or []) if isinstance(cfg, dict) else []


def distributed_wrapper(model: nn.Module) -> str | None:
    """The kind of data-parallel wrapper around or inside ``model`` whose set of synchronised parameters was fixed
    when it was built (``DistributedDataParallel``'s reducer, ``fully_shard``'s parameter groups), None without
    one. LoRA parameters added or unfrozen after that would train on each rank apart, without a word."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        FSDPModule = ()  # noqa: N806  (isinstance against an empty tuple: never)
    for module in model.modules():
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return "DistributedDataParallel"
        if isinstance(module, FSDPModule):
            return "FSDP2 (fully_shard)"
    return None


def check_trainable_before_wrap(wrapper: str | None, who: str, new: int, to_train: Iterable) -> None:
    """Refuse to add ``new`` LoRA layers, or to make frozen parameters of ``to_train`` trainable, under ``wrapper``
    (``distributed_wrapper``): DDP would never all-reduce their gradients (each rank would train its own adapter)
    and fully_shard would not shard them. ``to_train`` is read only under a wrapper."""
    if wrapper is None:
        return
    frozen = sum(not p.requires_grad for p in to_train)
    if not (new or frozen):
        return
    what = " and ".join(part for part in (f"{new} new LoRA layer(s)" if new else "",
                                          f"{frozen} frozen parameter(s) made trainable" if frozen else "") if part)
    raise ValueError(f"{who}: the model is already wrapped in {wrapper}, which fixed the parameters it synchronises "
                     f"when it was built; {what} would train separately on each rank. Add the adapter first, then "
                     "wrap the model (DistributedDataParallel(model) / fully_shard), as lora_fast.train does")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s ``OptimizedModule``, torch's activation-checkpoint wrapper and DDP /
    DataParallel wrappers (unwrapped repeatedly), else ``model`` itself: adapter keys and task types are the wrapped
    model's, as PEFT's ``save_pretrained`` of a compiled model writes them (not ``_orig_mod.``/``module.``
    prefixed). Wrappers further down the tree: ``lora_fast.module_names``."""
    while True:
        if (attr := wrapper_inner(model)) is not None:
            model = model._modules[attr]
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def count_parameters(model: nn.Module) -> dict:
    """{'total', 'trainable', 'frozen', 'percentage'}; shared (tied) parameters counted once, as PEFT does."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "percentage": 100.0 * trainable / total if total else 0.0}
