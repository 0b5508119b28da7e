"""Adapter files in PEFT's format: ``save_adapter`` / ``load_adapter``, strict, safe and atomic.

A directory holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and ``adapter_model.safetensors`` with
PEFT's keys, so it loads with ``PeftModel.from_pretrained`` and PEFT-saved adapters load here:

    base_model.model.<module>.lora_A.weight   (r, in)      ↔  LinearWithLoRA.lora.lora_A
    base_model.model.<module>.lora_B.weight   (out, r)     ↔  LinearWithLoRA.lora.lora_B
    base_model.model.<module>.<param>                       ↔  a trainable non-LoRA module (``modules_to_save``)

Conv1D targets (GPT-2) get ``fan_in_fan_out: true``; A and B keep the same layout either way (only the base
weight is transposed). Per-module ranks and alphas go to ``rank_pattern``/``alpha_pattern``, matched as PEFT 0.21
does (``lora_fast.adapter_config``, which builds and checks the config).

Loading is strict by default: missing, unexpected and mis-shaped keys raise ``ValueError`` naming them (PEFT only
warns, leaving the adapter at its initial values). Everything is checked before the model is touched, so a failed
load leaves it unchanged. Besides the safetensors file, the legacy ``adapter_model.bin`` is read with
``torch.load(weights_only=True)`` (no arbitrary unpickling), as PEFT's plain state dict or the tutorials'
``{'lora_state_dict': {...}, 'config': {...}}`` (``lora_fast.adapter_files``, which reads and writes the files).

Writes are atomic (temporary files, fsync'ed, then ``os.replace``), so an interrupted save leaves the previous
adapter intact; ``lora_fast.adapter_files`` says what window is left.

Sharded models (FSDP2 ``fully_shard``: parameters are DTensors): ``save_adapter`` must then be called on every
rank, in the same order; it gathers each LoRA tensor (``DTensor.full_tensor()``, a collective) and rank 0 alone
writes the files (the other ranks return without writing). Everything is serialised before the directory is
created, so a failure leaves no empty or half-written directory behind.

Full base weights that PEFT saves beside the adapter are loaded into the base model (shape-checked, left frozen):
the input/output embeddings of a resized vocabulary (``model.embed_tokens.weight``, ``lm_head.weight``), a LoRA-
targeted embedding or lm_head (``lm_head.base_layer.weight``), and, with ``ensure_weight_tying``, the partner tied to
a ``modules_to_save`` parameter (``lm_head.weight`` beside ``model.embed_tokens.weight``; keys going into one tied
tensor must hold equal values). ``save_adapter`` writes that tied partner's key too, as PEFT does and needs, and,
like PEFT's ``save_embedding_layers="auto"``, the full embedding weights when the model's ``vocab_size`` differs from
the one in ``<base_model_name_or_path>/config.json`` (a local directory; the hub is not consulted).

Known limits: one adapter per model; DoRA, ``lora_bias``, ``bias != "none"``, embedding/conv targets and PEFT's
other LoRA variants are refused with an error naming the field (PEFT serves those).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from lora_fast.adapter_config import (
    TASK_TYPES,
    _adapter_config,
    _candidate_names,
    _check_config,
    _default_task_type,
    _names,
    _peft_targets,
    pattern_value,
)
from lora_fast.adapter_files import (
    BIN_NAME,  # noqa: F401 (re-exported: the file names stay importable from lora_fast.adapter)
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _dtensor_type,
    _gather_full,
    _normalise_config,
    _read_adapter,
    write_adapter_files,
)
from lora_fast.functional import resolve_backend
from lora_fast.inject import (
    SEQ_CLS_HEAD_NAMES,  # noqa: F401 (re-exported)
    TASK_HEAD_NAMES,
    _set_submodule,
    apply_lora,
    check_trainable_before_wrap,
    distributed_wrapper,
    is_peft_layer,
    lora_layers,
    modules_saved_whole,
    multihead_out_projs,
    names_by_id,
    parameter_names,
    prepare_for_checkpointing,
    untie_embeddings_in_config,
    unwrap_model,
)
from lora_fast.layer import LORA_BASE_TYPES, LinearWithLoRA
from lora_fast.module_names import check_no_fsdp1, plain_module_names
from lora_fast.reference import lora_scaling


def _modules_to_save(model: nn.Module, lora_names, entries) -> list[str]:
    """The modules PEFT wraps for ``modules_to_save`` ``entries``: every module whose name ends with an entry — PEFT
    0.21's ``_set_trainable`` tests a plain ``endswith``, no '.' boundary, so ``classifier`` also takes DistilBERT's
    ``pre_classifier`` and ``norm`` every ``*_layernorm`` — outermost only (a wrapped module's children are not
    wrapped again). Modules inside LoRA layers do not exist for PEFT and are not considered."""
    names = [n for n in _candidate_names(model, lora_names) if any(n.endswith(e) for e in entries)]
    return [n for n in names if not any(n.startswith(f"{o}.") for o in names)]


class AdapterLoadResult(NamedTuple):
    """What ``load_adapter`` could not match: keys the model expected but the file lacks, and the reverse."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# ----------------------------------------------------------------------------------------------------------- save
def _trainable_extras(model: nn.Module, layers) -> list[str]:
    """Modules owning trainable non-LoRA parameters: PEFT's ``modules_to_save``."""
    owners = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = pname.rpartition(".")[0]
        inside = [n for n in layers if pname.startswith(f"{n}.")]
        if inside:
            if pname.startswith(f"{inside[0]}.lora."):
                continue
            raise ValueError(f"save_adapter: base parameter {pname!r} of LoRA layer {inside[0]!r} is trainable; "
                             "PEFT's adapter format cannot hold it (freeze it, or merge and save the full model)")
        if not owner:
            raise ValueError(f"save_adapter: trainable parameter {pname!r} belongs to the root module; PEFT's "
                             "modules_to_save needs a named submodule")
        if owner not in owners:
            owners.append(owner)
    return owners


def save_adapter(model: nn.Module, directory, *, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Save the model's LoRA adapter (and trainable non-LoRA modules) in PEFT's format, atomically.

    On an FSDP2-sharded model call it on every rank: the full tensors are gathered there and rank 0 writes;
    the other ranks return at once (no barrier): one that reads the directory next waits for it (``dist.barrier()``).

    Args:
        model: a model with lora_fast LoRA layers (``apply_lora`` or ``load_adapter``); a ``torch.compile`` or
            DDP/DataParallel wrapper of one is unwrapped (keys without ``_orig_mod.``/``module.``, as PEFT writes),
            and wrappers inside it (activation checkpointing, compiled blocks) are seen through
            (``lora_fast.module_names``).
        directory: created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` are replaced,
            other files are left alone.
        base_model_name_or_path: recorded in the config; default ``model.config._name_or_path`` or
            ``model.name_or_path``.
        task_type: PEFT task type (one of ``TASK_TYPES``, checked); default: the loaded adapter's, else from the
            model's class — "CAUSAL_LM" (``*ForCausalLM``/``*LMHeadModel``), "SEQ_CLS", "TOKEN_CLS",
            "QUESTION_ANS" (their heads then travel whole, as PEFT saves them; a token or QA head holding LoRA
            keeps None instead), "SEQ_2_SEQ_LM" (a text encoder-decoder ``*ForConditionalGeneration``), else None
            (PEFT's generic ``PeftModel``, which runs any model's forward).

    Returns:
        The directory as a ``pathlib.Path``.

    Raises:
        TypeError: ``model`` is a PEFT model (use its ``save_pretrained``).
        ValueError: no LoRA layer, or state PEFT's format cannot express (mixed rsLoRA, trainable base weights),
            or DTensor parameters without an initialized process group to gather them, or an FSDP1-wrapped model,
            or LoRA tensors not of their layer's shape (partitioned by DeepSpeed ZeRO-3 outside its gather), or a
            task type PEFT refuses (given, or recorded from the loaded adapter).
        IsADirectoryError: a directory sits where one of the adapter's files goes (nothing is written then).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_adapter: expected an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # torch.compile / DDP wrappers: the keys are the wrapped model's, as PEFT writes
    if hasattr(model, "peft_config"):
        raise TypeError("save_adapter: this is a PEFT model; save it with its own save_pretrained()")
    check_no_fsdp1(model, "save_adapter")
    for above in (Path(directory), *Path(directory).parents):  # before any work, not a bare errno at the end
        if above.exists():
            if not above.is_dir():
                raise NotADirectoryError(f"save_adapter: {str(above)!r} is a file; the adapter is saved into a "
                                         f"directory ({str(directory)!r})")
            break
    with plain_module_names(model):  # keys without _checkpoint_wrapped_module / _orig_mod segments, as PEFT's
        return _save_adapter(model, directory, base_model_name_or_path, task_type)


def _save_adapter(model: nn.Module, directory, base_model_name_or_path: str | None, task_type: str | None) -> Path:
    from safetensors.torch import save as safetensors_bytes

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no lora_fast LoRA layer (apply_lora first)")
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"save_adapter: task_type {task_type!r} is not one of PEFT's {list(TASK_TYPES)} (or None)")
    recorded = None if task_type else _recorded_task_type(model)
    if recorded and recorded not in TASK_TYPES:  # set by hand, or by a lora_fast that did not check it
        raise ValueError(f"save_adapter: the model's recorded task_type {recorded!r} (model.lora_fast_config, kept "
                         f"from the adapter it was loaded from) is not one of PEFT's {list(TASK_TYPES)} (or None), "
                         "and PEFT would refuse the saved adapter; pass task_type= to save_adapter")
    given = task_type or recorded
    task_type = given or _default_task_type(model)
    heads = _modules_to_save(model, list(layers), TASK_HEAD_NAMES.get(task_type, ()))  # PEFT wraps these whole
    if not given and task_type in ("TOKEN_CLS", "QUESTION_ANS") and any(
            n == h or n.startswith(f"{h}.") for h in heads for n in layers):
        task_type, heads = None, []  # inferred only: LoRA in the head (all-linear) stays loadable, as before
    extras = list(dict.fromkeys(_trainable_extras(model, layers) + _recorded_extras(model, layers) + heads))
    extras = [e for e in extras if not any(e.startswith(f"{o}.") for o in extras)]  # PEFT wraps the outermost
    inside = [f"{n!r} (in {e!r})" for e in extras for n in layers if n == e or n.startswith(f"{e}.")]
    if inside:
        raise ValueError(f"save_adapter: LoRA layer(s) {', '.join(inside)} sit inside a module PEFT saves whole "
                         "(modules_to_save: a trainable module, or a sequence-classification head); PEFT cannot "
                         "load LoRA weights there. Leave the head out of target_modules and train it whole, as "
                         "PEFT's SEQ_CLS adapters do: apply_lora(..., modules_to_save=[head]) leaves the targets "
                         "inside it out")
    config = _adapter_config(model, layers, extras, base_model_name_or_path, task_type)
    tied = _tied_outside(model, extras)
    if tied:  # trained as one tensor: loading must keep them one (load_adapter unties unless told otherwise)
        config["ensure_weight_tying"] = True
        warnings.warn(f"save_adapter: {', '.join(tied)} are tied to parameters outside the saved modules; the "
                      "adapter says ensure_weight_tying: true and holds the partners' keys too, so that loading "
                      "restores both", stacklevel=2)

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora.lora_A  # (r, in)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora.lora_B  # (out, r)
    for owner in extras:
        for k, v in model.get_submodule(owner).state_dict().items():
            tensors[f"{PREFIX}{owner}.{k}"] = v
    for sub, leaf, _full, others in _shared_params(model, extras):
        for other in others:  # PEFT saves the tied partner too (lm_head.weight beside embed_tokens.weight) and needs it
            tensors.setdefault(f"{PREFIX}{_peft_param_name(other, layers)}", getattr(sub, leaf))
    if _vocab_resized(model, config["base_model_name_or_path"]):  # PEFT's save_embedding_layers="auto" rule
        for key, (module, leaf) in _base_weight_keys(model, layers, []).items():
            tensors.setdefault(key, getattr(module, leaf))
    tensors, sharded = _gather_full(tensors)
    declared = _lora_shapes({n: (m.rank, m.in_features, m.out_features) for n, m in layers.items()})
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {shape})" for k, shape in declared.items()
             if tuple(tensors[k].shape) != shape]
    if wrong:  # e.g. DeepSpeed ZeRO-3 leaves each rank an empty placeholder outside its gather context
        raise ValueError(f"save_adapter: LoRA tensors do not have their layers' shapes: {_names(wrong)}. Parameters "
                         "partitioned by a wrapper lora_fast does not gather (DeepSpeed ZeRO-3: save inside "
                         "deepspeed.zero.GatheredParameters) cannot be saved as they are; FSDP2 is gathered here")
    files = {  # serialised before anything touches the disk; the config last (write_adapter_files' commit marker)
        WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }
    directory = Path(directory)
    if sharded:
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return directory
    write_adapter_files(directory, files)  # the config last: the commit marker
    return directory


def _lora_shapes(dims: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int]]:
    """{PEFT key: shape} for layers given as {name: (r, in, out)}: A (r, in), B (out, r)."""
    shapes = {}
    for name, (r, in_f, out_f) in dims.items():
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (r, in_f)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (out_f, r)
    return shapes


def _recorded_extras(model: nn.Module, layers) -> list[str]:
    """``modules_to_save`` recorded by ``apply_lora``/``load_adapter`` (still present): saved even when frozen
    (``is_trainable=False``), as PEFT keeps them."""
    have = {n for n, _ in model.named_modules()}
    return [n for n in modules_saved_whole(model) if n in have and n not in layers]


def _recorded_task_type(model: nn.Module) -> str | None:
    """The task type of the adapter ``load_adapter`` loaded into ``model`` (kept when it is saved again)."""
    cfg = getattr(model, "lora_fast_config", None)
    return cfg.get("task_type") if isinstance(cfg, dict) else None


def _vocab_resized(model: nn.Module, base_model_name_or_path) -> bool:
    """Whether the model's vocabulary differs from its base's (PEFT's ``save_embedding_layers="auto"`` rule): then
    the full embedding weights go into the adapter. The base's ``config.json`` is read from a local directory or,
    for a hub name, from the Hugging Face cache only (never downloaded). When it cannot be read, the embeddings are
    not saved and a warning says so (PEFT warns alike)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or not base_model_name_or_path:
        return False
    base_vocab = _base_vocab(str(base_model_name_or_path))
    if base_vocab is None:
        warnings.warn(f"save_adapter: could not read the config of the base model {base_model_name_or_path!r} (not a "
                      "local directory, not in the Hugging Face cache), so whether its vocabulary was resized is "
                      "unknown; the embedding weights are not saved. If you resized them (resize_token_embeddings), "
                      "name the embedding and output layers in modules_to_save", stacklevel=4)
        return False
    return base_vocab != vocab


def _base_vocab(name: str) -> int | None:
    """``vocab_size`` of ``name``'s config: a local directory's ``config.json``, else the HF cache's; None if
    neither can be read."""
    from lora_fast.train_model import RANDOM_GPT2

    if name == RANDOM_GPT2:  # the CLI's randomly initialised GPT-2 124M
        from transformers import GPT2Config

        return GPT2Config().vocab_size
    path = Path(name) / "config.json"
    if path.is_file():
        try:
            vocab = json.loads(path.read_text(encoding="utf-8")).get("vocab_size")  # JSON is UTF-8, any locale
        except (OSError, ValueError, AttributeError):
            return None
        return vocab if isinstance(vocab, int) else None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # not cached, not a valid name, no transformers: unknown
        return None
    vocab = getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


# ----------------------------------------------------------------------------------------------------------- load
def _in_out(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else (w.shape[0], w.shape[1])


def _module_aliases(model: nn.Module, owners) -> list[tuple[str, list[str]]]:
    """(owner, its other names) for each ``owners`` module that is also reachable under names outside it."""
    names = names_by_id(model.named_modules(remove_duplicate=False))
    out = []
    for owner in owners:
        others = [n for n in names.get(id(model.get_submodule(owner)), [])
                  if n != owner and not n.startswith(f"{owner}.")]
        if others:
            out.append((owner, others))
    return out


def _shared_params(model: nn.Module, owners):
    """(owner's sub-module, leaf name, full name, the other names sharing that tensor) for each parameter of the
    ``owners`` modules that is shared with a parameter outside them."""
    names_of = parameter_names(model)
    for owner in owners:
        for sub_name, sub in model.get_submodule(owner).named_modules():
            for leaf, p in list(sub.named_parameters(recurse=False)):
                full = ".".join(x for x in (owner, sub_name, leaf) if x)
                others = [n for n in names_of.get(id(p), []) if n != full and not n.startswith(f"{owner}.")]
                if others:
                    yield sub, leaf, full, others


def _peft_param_name(pname: str, lora_names) -> str:
    """A base parameter's name as PEFT sees it: inside a (present or planned) LoRA layer ``X`` it is
    ``X.base_layer.<leaf>`` (lora_fast: ``X.linear.<leaf>`` once wrapped, ``X.<leaf>`` before)."""
    owner, _, leaf = pname.rpartition(".")
    for name in lora_names:
        if owner in (name, f"{name}.linear"):
            return f"{name}.base_layer.{leaf}"
    return pname


def _base_weight_keys(model: nn.Module, lora_names, owners) -> dict[str, tuple[nn.Module, str]]:
    """{PEFT key: (module, leaf)} for base parameters a PEFT adapter may carry in full: those of the input and output
    embeddings (``save_embedding_layers``: a resized vocabulary, or an embedding/lm_head LoRA target, whose key is
    then ``<module>.base_layer.weight``) and the parameters tied to a ``modules_to_save`` parameter
    (``ensure_weight_tying``: ``lm_head.weight`` beside ``embed_tokens.weight``). Keys of LoRA tensors excluded."""
    wanted = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, get)() if hasattr(model, get) else None
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, nn.Module):
            wanted.update(id(p) for n, p in module.named_parameters() if ".lora." not in f".{n}")
    for sub, leaf, _full, _others in _shared_params(model, owners):
        wanted.add(id(getattr(sub, leaf)))
    out = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in wanted and ".lora." not in f".{pname}":
            owner, _, leaf = pname.rpartition(".")
            out[f"{PREFIX}{_peft_param_name(pname, lora_names)}"] = (model.get_submodule(owner), leaf)
    return out


# PEFT 0.21 keeps a modules_to_save module tied (``ensure_weight_tying``) only if an entry's last segment is one of
# these (peft.utils.constants.EMBEDDING_LAYER_NAMES, read in BaseTuner._check_tied_modules); for others (GPT-2's
# ``wte``) it warns and leaves the partner (``lm_head``) with the base's weight
PEFT_TIEABLE_NAMES = ("embed_tokens", "lm_head")


def peft_keeps_tie(cfg: dict) -> bool:
    """Whether PEFT loads ``cfg``'s modules_to_save tied to their partners: ``ensure_weight_tying`` and an entry
    named as PEFT's embedding layers."""
    return bool(cfg.get("ensure_weight_tying")) and any(
        str(e).split(".")[-1] in PEFT_TIEABLE_NAMES for e in cfg.get("modules_to_save") or [])


def _tied_outside(model: nn.Module, owners) -> list[str]:
    return [f"{full} (~ {', '.join(others)})" for _, _, full, others in _shared_params(model, owners)]


def _untie_extras(model: nn.Module, owners, who: str = "load_adapter") -> None:
    """Give each ``modules_to_save`` module its own copy of any parameter it shares with the rest of the model (a
    GPT-2 ``lm_head`` tied to ``wte``), as PEFT keeps a separate copy of such modules: loading the saved head must
    not overwrite the input embeddings. Warns once, naming what was untied."""
    untied = []
    for owner, others in _module_aliases(model, owners):  # one module under several names (T5's shared on
        # transformers 4 is encoder.embed_tokens and decoder.embed_tokens too): the owner's name gets a copy of its
        # own, as PEFT's wrapper holds one, and the other names keep the original module
        _set_submodule(model, owner, copy.deepcopy(model.get_submodule(owner)))
        untied.append(f"{owner} (was the same module as {', '.join(others)}, which keep the original: a forward "
                      "that reads the module under those names — T5's encoder and decoder read embed_tokens — does "
                      "not use the trained copy; name those in modules_to_save to train what they read)")
    for sub, leaf, full, others in list(_shared_params(model, owners)):
        p = getattr(sub, leaf)
        setattr(sub, leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        untied.append(f"{full} (was tied to {', '.join(others)})")
    if untied:
        flag = untie_embeddings_in_config(model)
        flag = f"; {flag}" if flag else ""
        warnings.warn(f"{who}: modules_to_save " + "; ".join(untied) + " now have their own weights, as in "
                      f"PEFT (training or loading them must not change the parameters they were tied to{flag})",
                      stacklevel=3)


def load_adapter(model: nn.Module, directory, strict: bool = True, backend: str | None = None, *,
                 is_trainable: bool = True) -> AdapterLoadResult:
    """Load an adapter directory (PEFT's format, or the legacy ``adapter_model.bin``) into ``model`` in place.

    A model without LoRA layers gets them injected as the config says (``target_modules``, ``r``/``rank_pattern``,
    ``lora_alpha``/``alpha_pattern``, ``use_rslora``, ``lora_dropout``; Linear and Conv1D bases). A model that
    already has LoRA layers keeps them: their weights are replaced and their alpha/rsLoRA/dropout set from the
    config. Modules in ``modules_to_save`` are loaded and made trainable, as PEFT does with ``is_trainable=True``.

    Args:
        model: the base model (a transformers model, typically), with or without lora_fast layers.
        directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
        strict: raise on missing or unexpected keys (mis-shaped keys always raise). ``False`` loads what fits.
        backend: forwarded to the LoRA layers (None leaves existing layers' choice, ``LORA_FAST_BACKEND``).
        is_trainable: ``True`` (default: load to go on training) leaves the loaded LoRA weights and
            ``modules_to_save`` trainable; ``False`` freezes them for inference and puts the model in eval mode
            (no dropout), as PEFT's ``from_pretrained`` / ``load_adapter`` do by default (no autograd graph, no
            activations kept outside ``torch.no_grad``). With ``True`` the new layers take the model's mode (unlike
            ``apply_lora``'s, which train as ``get_peft_model``'s do): this default is PEFT's ``False``'s place, so
            a load for inference on an eval model must stay free of dropout.

    Returns:
        ``AdapterLoadResult(missing_keys, unexpected_keys)``, both empty after a strict load.

    Raises:
        FileNotFoundError: the directory lacks the files. ValueError: bad keys (named; or one tensor under two
        spellings), unsupported or invalid config fields (named, with the config holding them: the JSON file or the
        legacy .bin's own), a pickle with non-tensor objects, or merged LoRA layers (unmerge first). Nothing is
        modified then.
    """
    directory = Path(directory)
    if not directory.is_dir():
        hub = not directory.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(directory))
        raise FileNotFoundError(f"load_adapter: {str(directory)!r} is not a directory" + (
            "; adapters are loaded from a local directory, not the Hugging Face hub: download it first "
            "(huggingface_hub.snapshot_download(repo_id) returns the directory)" if hub else ""))
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter: expected an nn.Module, got {type(model).__name__}")
    wrapper = distributed_wrapper(model) if is_trainable else None  # DDP is outside the unwrapped model
    model = unwrap_model(model)  # torch.compile / DDP wrappers: loaded into the model they wrap
    if hasattr(model, "peft_config"):
        raise TypeError("load_adapter: this model carries PEFT's adapter (peft_config: a PeftModel, or the model "
                        "inside one, with PEFT's LoRA layers in place); use PEFT's load_adapter(), or load into a "
                        "model without them (a fresh base model, or PEFT's unload())")
    check_no_fsdp1(model, "load_adapter")
    with plain_module_names(model) as compiled:  # the file's keys are the plain model's names
        result = _load_adapter(model, directory, strict, backend, is_trainable, compiled, wrapper)
    if not is_trainable:
        model.eval()  # again, now with the wrappers back in the tree (they were out when _load_adapter set it)
    return result


def _with_task_heads(cfg: dict) -> dict:
    """As PEFT: a task's head (SEQ_CLS: ``score``/``classifier``, ...) is saved whole, never a LoRA target."""
    if cfg.get("task_type") not in TASK_HEAD_NAMES:
        return cfg
    to_save = list(cfg.get("modules_to_save") or [])
    return {**cfg, "modules_to_save": to_save + [n for n in TASK_HEAD_NAMES[cfg["task_type"]] if n not in to_save]}


def _resolved(model: nn.Module, cfg: dict, existing: dict) -> dict:
    """What ``cfg`` makes of ``model``: LoRA targets with their (r, alpha), rsLoRA, dropout, modules saved whole.
    Two configs that spell one adapter differently (target_modules None / a list / a regex, int or float alpha,
    patterns in another order) resolve alike."""
    names = list(existing) if existing else _peft_targets(model, cfg)
    return {
        "targets": {n: (existing[n].rank if n in existing else pattern_value(cfg.get("rank_pattern"), n, cfg["r"]),
                        float(pattern_value(cfg.get("alpha_pattern"), n, cfg["lora_alpha"]))) for n in names},
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "lora_dropout": float(cfg.get("lora_dropout") or 0.0),
        "modules_to_save": _modules_to_save(model, names, list(cfg.get("modules_to_save") or [])),
    }


def _check_target_type(name: str, module: nn.Module, who: str) -> None:
    """Refuse a target of a config that lora_fast cannot wrap (not a Linear/Conv1D, nor a lora_fast layer)."""
    if isinstance(module, (LinearWithLoRA,) + LORA_BASE_TYPES):
        return
    cls = f"{type(module).__module__}.{type(module).__qualname__}"  # PEFT's layer is a "Linear" too
    if type(module).__module__.startswith("peft.") or is_peft_layer(module):  # patch_peft's subclass too
        hint = " — a PEFT layer left in the model (take PEFT's layers off first: PeftModel.unload())"
    else:
        hint = " (load this adapter with PEFT)" if who == "load_adapter" else " (build this adapter with PEFT)"
    raise ValueError(f"{who}: target {name!r} is a {cls}; lora_fast supports nn.Linear and transformers' Conv1D"
                     + hint)


def apply_config(model: nn.Module, config, backend: str | None = None) -> nn.Module:
    """``apply_lora(model, config=LoraConfig(...))``: the adapter a PEFT ``LoraConfig`` (or its ``to_dict()``)
    describes, as ``get_peft_model`` builds it: its targets (``target_modules`` with PEFT's defaults,
    ``exclude_modules``, ``layers_to_transform``/``layers_pattern``), per-module ``rank_pattern``/``alpha_pattern``,
    ``use_rslora``, ``lora_dropout``, ``modules_to_save`` and the task's head, frozen under ``inference_mode``.
    Fields lora_fast does not implement are refused by name, as by ``load_adapter``, and so are the ones that only
    matter when building: ``init_lora_weights`` other than True (PEFT's default init is the only one) and
    ``ensure_weight_tying``. One ``apply_lora`` call makes the layers in module order, as PEFT: one seed draws
    PEFT's adapter."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"apply_lora: config must be a PEFT LoraConfig or a dict of its fields, got "
                        f"{type(config).__name__}")
    cfg = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}  # LoraConfig: sets
    cfg = _normalise_config(cfg, "the config", legacy=True)  # lora_fast's names (rank, alpha, ...) taken too
    _check_config(cfg, "the config", who="apply_lora")
    building = {f: cfg[f] for f, ok in (("init_lora_weights", True), ("ensure_weight_tying", False))
                if cfg.get(f, ok) != ok}
    if building:
        raise ValueError(f"apply_lora: the config sets {building}, which lora_fast does not implement (it "
                         "initialises as PEFT's default, init_lora_weights=True, and unties modules_to_save); "
                         "build this adapter with PEFT's get_peft_model")
    cfg = _with_task_heads(cfg)
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers; a config describes a whole adapter: "
                         "apply it to a model without them (a fresh base model, or lora_fast.unload(model) first)")
    ours = _resolved(model, cfg, {})
    if not ours["targets"]:
        raise ValueError(f"apply_lora: the config's target_modules {cfg.get('target_modules')!r} match no module of "
                         f"{type(model).__name__}")
    for name in ours["targets"]:
        _check_target_type(name, model.get_submodule(name), "apply_lora")
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    apply_lora(model, "|".join(re.escape(n) for n in ours["targets"]), rank=r, alpha=alpha,
               dropout=ours["lora_dropout"], use_rslora=ours["use_rslora"], backend=backend,
               modules_to_save=ours["modules_to_save"] or None,
               _plan={n: ra for n, ra in ours["targets"].items() if ra != (r, alpha)})
    model.lora_fast_config["target_modules"] = cfg.get("target_modules")
    if cfg.get("task_type"):
        model.lora_fast_config["task_type"] = cfg["task_type"]
    if cfg.get("inference_mode"):  # as get_peft_model: nothing trainable
        model.requires_grad_(False)
    return model


def _diff(a, b) -> list[str]:
    """The entries where two resolved values differ, for the error message."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if isinstance(a, list) and isinstance(b, list):
        return [f"{n} only in one" for n in sorted(set(a) ^ set(b))] or [f"{a} vs {b}"]
    return [f"{a} vs {b}"]


_MAX_MISSHAPED = 4  # mis-shaped keys named in full (each with both shapes) before "... and N more"


def _other_model_hint(plan: dict, state: dict, base: str | None, model_cls: str) -> str:
    """The LoRA layers' feature sizes that the file's A (r, in) and B (out, r) give, against the model's: when they
    differ the adapter was made for another model (another width; a rank alone differing is said apart).

    plan: {module name: (in, out, r, alpha)}; state: the file's tensors, PEFT-keyed."""
    other = []  # (name, file's in -> out, model's in -> out)
    for name, (in_f, out_f, _, _) in plan.items():
        a, b = state.get(f"{PREFIX}{name}.lora_A.weight"), state.get(f"{PREFIX}{name}.lora_B.weight")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2:
            continue
        if (a.shape[1], b.shape[0]) != (in_f, out_f):
            other.append((name, f"{a.shape[1]} -> {b.shape[0]}", f"{in_f} -> {out_f}"))
    if not other:
        return ""
    name, theirs, ours = other[0]
    made_for = f" (its config names {base!r})" if base else ""
    return (f". {len(other)} of the {len(plan)} LoRA layers have other feature sizes in the file (e.g. {name}: "
            f"{theirs} in the file, {ours} in this {model_cls}): the adapter was made for another model{made_for}; "
            "load it into the base model it was trained on")


def _copy_into(dest: torch.Tensor, value: torch.Tensor) -> None:
    """``dest.copy_(value)``; into a sharded DTensor parameter (FSDP2's ``fully_shard``) each rank copies its own shard
    of ``value``, which every rank read from the same file (``distribute_tensor(src_data_rank=None)``: no collective),
    where a plain ``copy_`` fails on mixing a tensor and a DTensor."""
    value = value.to(dest.device)
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(dest, dtensor):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(dest.dtype), dest.device_mesh, dest.placements, src_data_rank=None)
    dest.copy_(value)


def _load_adapter(model: nn.Module, directory: Path, strict: bool, backend: str | None, is_trainable: bool,
                  compiled: set[int], wrapper: str | None) -> AdapterLoadResult:
    cfg, state, source, second, where = _read_adapter(directory)
    _check_config(cfg, where)  # config problems name the config (the JSON file or the .bin's own), not the weights
    cfg = _with_task_heads(cfg)
    existing = lora_layers(model)
    merged = [n for n, m in existing.items() if m.merged]
    if merged:
        raise ValueError(f"load_adapter: LoRA layers are merged ({_names(merged)}); call unmerge_lora(model) first")
    ours = _resolved(model, cfg, existing)  # the adapter to build: targets with (r, alpha), modules saved whole
    if second is not None:  # a legacy .bin's own config and an adapter_config.json: both must mean one adapter
        _check_config(second, directory / CONFIG_NAME)
        theirs = _resolved(model, _with_task_heads(second), existing)
        differ = [f"{k}: {_names(_diff(ours[k], theirs[k]))}" for k in ours if ours[k] != theirs[k]]
        if differ:
            raise ValueError(f"load_adapter: {source} carries its own config, and {directory / CONFIG_NAME} beside "
                             f"it makes another adapter of {type(model).__name__} ({'; '.join(differ)}); remove "
                             "the one that does not belong to these weights")

    plan = {}  # module name -> (in, out, r, alpha)
    names = list(ours["targets"])
    if not names:
        raise ValueError(f"load_adapter: target_modules {cfg.get('target_modules')!r} of {where} match no module "
                         f"of {type(model).__name__}")
    mha_out = sorted(multihead_out_projs(model).intersection(names))
    if mha_out:  # apply_lora refuses or leaves these out; an adapter file may name them (PEFT wraps them too)
        warnings.warn(f"load_adapter: {source} adapts {_names(mha_out)}, the out_proj of nn.MultiheadAttention, "
                      "which reads its weight directly and never calls it: those LoRA weights change nothing (in "
                      "PEFT either)", stacklevel=3)
    for name in names:
        module = existing[name] if name in existing else model.get_submodule(name)
        _check_target_type(name, module, "load_adapter")
        if name not in existing and id(module) in compiled:
            raise ValueError(f"load_adapter: target {name!r} is compiled on its own (torch.compile of that "
                             "projection), and its compiled code would keep calling the module without LoRA; load "
                             "the adapter first, then compile (or compile a module around it)")
        in_f, out_f = (module.in_features, module.out_features) if name in existing else _in_out(module)
        plan[name] = (in_f, out_f, *ours["targets"][name])
    lora_names = list(plan)
    expected = _lora_shapes({n: (r, in_f, out_f) for n, (in_f, out_f, r, _) in plan.items()})
    extras = ours["modules_to_save"]
    destination = {}  # key -> the tensor it is copied into (extras untied below get their own copies)
    untie = not peft_keeps_tie(cfg)  # PEFT keeps tied modules_to_save tied only when asked to, for some names
    untied = {id(getattr(sub, leaf)) for sub, leaf, _, _ in _shared_params(model, extras)} if untie else set()
    for owner in extras:
        for k, v in model.get_submodule(owner).state_dict(keep_vars=True).items():
            key = f"{PREFIX}{owner}.{k}"
            expected[key], destination[key] = tuple(v.shape), (("copy", key) if id(v) in untied else id(v))
    # Full base weights PEFT may save (resized or targeted embeddings, tied partners): loaded when present.
    base_weights = {k: ml for k, ml in _base_weight_keys(model, lora_names, extras).items() if k not in expected}
    for k, (module, leaf) in base_weights.items():
        expected[k] = tuple(getattr(module, leaf).shape)
        destination[k] = id(getattr(module, leaf))

    recorded_saved = modules_saved_whole(model) if existing else []
    left = [m for m in recorded_saved if m not in extras]  # (unload keeps them trained too: a fresh base only)
    if left:  # trained in place: the new adapter's outputs would carry them, and save_adapter would write them
        raise ValueError(f"load_adapter: the model holds modules saved whole by its previous adapter "
                         f"({_names(left)}), which {source}'s config does not list: their trained weights would stay "
                         "in the model (their original weights are gone, trained in place), so the outputs would not "
                         "be this adapter's; load it into a freshly loaded base model")

    missing = sorted(k for k in expected if k not in state and k not in base_weights)
    unexpected = sorted(k for k in state if k not in expected)
    misshaped = [f"{k} (expected {expected[k]}, file has {tuple(v.shape)})"
                 for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    misshaped += [f"{k} (dtype {v.dtype} is not floating point)"
                  for k, v in state.items() if k in expected and not v.is_floating_point()]
    if misshaped:
        resized = [k for k in base_weights if k in state and tuple(state[k].shape) != expected[k]  # rows only
                   and tuple(state[k].shape[1:]) == expected[k][1:]]
        hint = (f" ({_names(resized)}: full embedding weights of another vocabulary size; resize the model's "
                "embeddings (model.resize_token_embeddings) to the adapter's vocabulary first)" if resized else "")
        other_model = _other_model_hint(plan, state, cfg.get("base_model_name_or_path"), type(model).__name__)
        hint += other_model
        if existing and not other_model and any(".lora_A." in m or ".lora_B." in m for m in misshaped):
            ranks = sorted({existing[n].rank for n in lora_names if n in existing})
            hint += (f". The model already has LoRA layers of rank {', '.join(map(str, ranks))}: an adapter loads "
                     "into those; to load one of another rank, load it into a fresh base model" + (
                         "" if recorded_saved else " or take them off first (lora_fast.unload(model))"))
        raise ValueError(f"load_adapter: {len(misshaped)} mis-shaped key(s) in {source}: "
                         f"{_names(misshaped, _MAX_MISSHAPED)}{hint}")
    groups = {}  # keys going into one (tied) tensor must agree: which one would win is arbitrary
    for k in state:
        if k in destination:
            groups.setdefault(destination[k], []).append(k)
    for keys in groups.values():
        keys = sorted(keys)
        differing = [k for k in keys[1:] if not torch.equal(state[k], state[keys[0]])]
        if differing:
            raise ValueError(f"load_adapter: {source}: {keys[0]} and {_names(differing)} load into one tied tensor "
                             "(ensure_weight_tying / tied embeddings) but hold different values")
    if strict and (missing or unexpected):
        lora_keys = [k for k in missing + unexpected if ".lora_A." in k or ".lora_B." in k]
        layers = (f" The model already has LoRA layers ({_names(list(existing))}): an adapter loads into those, "
                  f"whatever its target_modules ({cfg.get('target_modules')!r}); to load an adapter of other "
                  "modules, take them off first (lora_fast.unload(model))." if existing and lora_keys else "")
        raise ValueError(
            f"load_adapter: {source} does not fit {type(model).__name__} "
            f"(strict=True; pass strict=False to load what fits). "
            + (f"Missing {len(missing)} key(s): {_names(missing)}. " if missing else "")
            + (f"Unexpected {len(unexpected)} key(s): {_names(unexpected)}." if unexpected else "")
            + layers
        )
    # Checks done: from here on the model is modified.
    use_rslora, dropout = bool(cfg.get("use_rslora", False)), float(cfg.get("lora_dropout", 0.0) or 0.0)
    if backend is not None:
        resolve_backend(backend)  # before the model is touched
    if not isinstance(is_trainable, bool):
        raise TypeError(f"load_adapter: is_trainable must be True or False, got {is_trainable!r}")
    new_layers = {}  # built (bases checked) before anything is replaced
    for name, (_, _, r, alpha) in plan.items():
        if name not in existing:
            base = model.get_submodule(name)
            try:
                layer = LinearWithLoRA(base, rank=r, alpha=float(alpha), dropout=dropout, use_rslora=use_rslora,
                                       backend=backend)
            except (TypeError, ValueError) as e:  # a quantised or offloaded base: which of the targets it is
                raise type(e)(f"load_adapter: {name}: {e}") from e
            new_layers[name] = layer.train(base.training)  # an eval model stays in eval mode
    check_trainable_before_wrap(wrapper, "load_adapter", len(new_layers), itertools.chain(  # wrapper: trainable only
        (p for n in lora_names if n in existing for p in existing[n].lora.parameters()),
        (p for e in extras for p in model.get_submodule(e).parameters())))
    for name, (_, _, _r, alpha) in plan.items():
        if name in existing:
            if not any(f"{PREFIX}{name}.lora_{ab}.weight" in state for ab in "AB"):
                continue  # strict=False, nothing of this layer in the file: it keeps its own scaling and dropout
            lora = existing[name].lora
            lora.alpha, lora.use_rslora, lora.dropout = float(alpha), use_rslora, dropout
            lora.scaling = lora_scaling(lora.rank, lora.alpha, use_rslora)
            if backend is not None:
                existing[name].backend = backend
        else:
            _set_submodule(model, name, new_layers[name])
    if not existing:
        for pname, p in model.named_parameters():
            p.requires_grad_(".lora.lora_" in f".{pname}")
        model.lora_fast_config = {"target_modules": cfg.get("target_modules"), "rank": cfg["r"],
                                  "alpha": float(cfg["lora_alpha"]), "dropout": dropout, "use_rslora": use_rslora}
    if isinstance(getattr(model, "lora_fast_config", None), dict):  # kept by a later save_adapter
        if cfg.get("task_type"):
            model.lora_fast_config["task_type"] = cfg["task_type"]
        recorded = modules_saved_whole(model)
        model.lora_fast_config["modules_to_save"] = recorded + [e for e in extras if e not in recorded]
    if untie:
        _untie_extras(model, extras)
    params = {}
    for name in lora_names:
        lora = model.get_submodule(name).lora
        params[f"{PREFIX}{name}.lora_A.weight"], params[f"{PREFIX}{name}.lora_B.weight"] = lora.lora_A, lora.lora_B
    for owner in extras:
        module = model.get_submodule(owner)
        params.update({f"{PREFIX}{owner}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
        module.requires_grad_(True)
    for k, (module, leaf) in base_weights.items():  # frozen base weights, as in PEFT
        params.setdefault(k, getattr(module, leaf))
    for name in lora_names:  # into existing layers too: an earlier is_trainable=False load froze them
        model.get_submodule(name).lora.requires_grad_(is_trainable)
    if not is_trainable:
        for owner in extras:
            model.get_submodule(owner).requires_grad_(False)
        model.eval()  # as PEFT's from_pretrained/load_adapter with is_trainable=False: no dropout at inference
    with torch.no_grad():
        for k, v in state.items():
            if k in params:
                _copy_into(params[k], v)
    if is_trainable:
        prepare_for_checkpointing(model)
    return AdapterLoadResult(missing, unexpected)
