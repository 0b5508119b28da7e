"""Adapter files in PEFT's format: ``save_adapter`` / ``load_adapter``, strict, safe and atomic.

A directory holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and ``adapter_model.safetensors`` with
PEFT's keys, so it loads with ``PeftModel.from_pretrained`` and PEFT-saved adapters load here:

    base_model.model.<module>.lora_A.weight   (r, in)      ↔  LinearWithLoRA.lora.lora_A
    base_model.model.<module>.lora_B.weight   (out, r)     ↔  LinearWithLoRA.lora.lora_B
    base_model.model.<module>.<param>                       ↔  a trainable non-LoRA module (``modules_to_save``)

Conv1D targets (GPT-2) get ``fan_in_fan_out: true``; A and B keep the same layout either way (only the base
weight is transposed). Per-module ranks and alphas go to ``rank_pattern``/``alpha_pattern``, matched as PEFT 0.21
does: a key is a regex that must match the end of the module name at a "." boundary, the first matching key wins.

Loading is strict by default: missing, unexpected and mis-shaped keys raise ``ValueError`` naming them (PEFT only
warns, leaving the adapter at its initial values). Everything is checked before the model is touched, so a failed
load leaves it unchanged. Besides the safetensors file, ``adapter_model.bin`` is read with
``torch.load(weights_only=True)`` (no arbitrary unpickling) in two forms: PEFT's plain state dict (keys as above),
or the tutorials' ``{'lora_state_dict': {...}, 'config': {...}}`` whose keys are lora_fast state-dict keys
``<module>.lora.lora_A`` / ``<module>.lora.lora_B`` and whose config is ``model.lora_fast_config``
(``rank``/``alpha``/``dropout``/``use_rslora``/``target_modules``) or PEFT's field names.

Writes are atomic: both files go to temporary files in the target directory (fsync'ed), then ``os.replace``
puts them in place, so an interrupted save leaves the previous adapter intact. The one window left is between the
two renames (microseconds), where the new weights may sit beside the old config.

Sharded models (FSDP2 ``fully_shard``: parameters are DTensors): ``save_adapter`` must then be called on every
rank, in the same order; it gathers each LoRA tensor (``DTensor.full_tensor()``, a collective) and rank 0 alone
writes the files (the other ranks return without writing). Everything is serialised before the directory is
created, so a failure leaves no empty or half-written directory behind.

Known limits: one adapter per model; DoRA, ``lora_bias``, ``bias != "none"``, embedding/conv targets and PEFT's
other LoRA variants are refused with an error naming the field (PEFT serves those).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from lora_fast.functional import resolve_backend
from lora_fast.inject import _resolve_targets, _set_submodule, classifier_head_name, lora_layers, module_matches
from lora_fast.layer import LORA_BASE_TYPES, LinearWithLoRA
from lora_fast.reference import lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# LoraConfig fields that change what the adapter computes and that lora_fast does not implement.
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "layer_replication", "target_parameters",
                "trainable_token_indices", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                "velora_config", "monteclora_config", "kasa_config")
_MAX_NAMED = 20  # keys listed in an error message before "... and N more"


class AdapterLoadResult(NamedTuple):
    """What ``load_adapter`` could not match: keys the model expected but the file lacks, and the reverse."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _names(keys) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else ""
    return ", ".join(map(str, keys[:_MAX_NAMED])) + more


def pattern_value(patterns: dict, name: str, default):
    """PEFT 0.21's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", name)`` gives the value, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ----------------------------------------------------------------------------------------------------------- save
def _default_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return "SEQ_CLS" if cls.endswith("ForSequenceClassification") else None


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
    """{module: value} for the modules whose value differs from ``default``, checked against PEFT's lookup."""
    pattern = {n: v for n, v in values.items() if v != default}
    if any(pattern_value(pattern, n, default) != v for n, v in values.items()):
        pattern = {re.escape(n): v for n, v in pattern.items()}
    return pattern


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


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
        "task_type": task_type if task_type is not None else _default_task_type(model),
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
        "use_dora": False,
        "lora_bias": False,
    }


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


def _write_file(fh, data: bytes) -> None:
    """Write ``data`` to an open temporary file (a seam for tests simulating an interrupted save)."""
    fh.write(data)


def _atomic_write_all(directory: Path, files: dict[str, bytes]) -> None:
    """Write every file to a fsync'ed temporary in ``directory`` first, then rename them all into place."""
    temps: dict[str, str] = {}
    umask = os.umask(0o022)  # mkstemp creates 0600 files; give them the mode a plain open() would
    os.umask(umask)
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            temps[name] = tmp
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as fh:
                _write_file(fh, data)
                fh.flush()
                os.fsync(fh.fileno())
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
        temps.clear()
        if hasattr(os, "O_DIRECTORY"):  # make the renames themselves durable (POSIX)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _gather_full(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(plain CPU copies of ``tensors``, whether any was a sharded DTensor). Gathering is a collective."""
    dtensor = _dtensor_type()
    sharded = dtensor is not None and any(isinstance(v, dtensor) for v in tensors.values())
    if sharded:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("save_adapter: the model holds sharded DTensor parameters (FSDP2) but no process group "
                             "is initialized; call save_adapter on every rank of the distributed job")
    out = {}
    for k, v in tensors.items():  # the same order on every rank: the gathers pair up
        v = v.detach()
        if dtensor is not None and isinstance(v, dtensor):
            v = v.full_tensor()
        # Own contiguous CPU copies: safetensors refuses shared or strided storage (tied weights, transposed views).
        out[k] = v.to("cpu", copy=True).contiguous()
    return out, sharded


def save_adapter(model: nn.Module, directory, *, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Save the model's LoRA adapter (and trainable non-LoRA modules) in PEFT's format, atomically.

    On an FSDP2-sharded model call it on every rank: the full tensors are gathered there and rank 0 writes.

    Args:
        model: a model with lora_fast LoRA layers (``apply_lora`` or ``load_adapter``).
        directory: created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` are replaced,
            other files are left alone.
        base_model_name_or_path: recorded in the config; default ``model.config._name_or_path`` or
            ``model.name_or_path``.
        task_type: PEFT task type; default "CAUSAL_LM" for ``*ForCausalLM``/``*LMHeadModel``, "SEQ_CLS" for
            ``*ForSequenceClassification``, else None.

    Returns:
        The directory as a ``pathlib.Path``.

    Raises:
        TypeError: ``model`` is a PEFT model (use its ``save_pretrained``).
        ValueError: no LoRA layer, or state PEFT's format cannot express (mixed rsLoRA, trainable base weights),
            or DTensor parameters without an initialized process group to gather them.
    """
    from safetensors.torch import save as safetensors_bytes

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_adapter: expected an nn.Module, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise TypeError("save_adapter: this is a PEFT model; save it with its own save_pretrained()")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no lora_fast LoRA layer (apply_lora first)")
    extras = _trainable_extras(model, layers)
    head = classifier_head_name(model)
    if (task_type or _default_task_type(model)) == "SEQ_CLS" and head and head not in layers and head not in extras:
        extras.append(head)  # PEFT always saves a SEQ_CLS head (modules_to_save) and expects it when loading
    config = _adapter_config(model, layers, extras, base_model_name_or_path, task_type)

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora.lora_A  # (r, in)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora.lora_B  # (out, r)
    for owner in extras:
        for k, v in model.get_submodule(owner).state_dict().items():
            tensors[f"{PREFIX}{owner}.{k}"] = v
    tensors, sharded = _gather_full(tensors)
    files = {  # serialised before anything touches the disk
        WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }
    directory = Path(directory)
    if sharded:
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return directory
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write_all(directory, files)
    return directory


# ----------------------------------------------------------------------------------------------------------- load
def _normalise_key(key: str) -> str:
    """lora_fast state-dict keys (``<m>.lora.lora_A``) → PEFT keys; anything else is kept as it is."""
    for ab in ("A", "B"):
        if key.endswith(f".lora.lora_{ab}") and not key.startswith(PREFIX):
            return f"{PREFIX}{key[: -len(f'.lora.lora_{ab}')]}.lora_{ab}.weight"
    return key


def _normalise_config(cfg: dict) -> dict:
    """Accept ``lora_fast_config`` names (rank/alpha/dropout) beside PEFT's (r/lora_alpha/lora_dropout)."""
    cfg = dict(cfg)
    for ours, peft in (("rank", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        if ours in cfg and peft not in cfg:
            cfg[peft] = cfg.pop(ours)
    cfg.setdefault("peft_type", "LORA")
    return cfg


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"load_adapter: cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"load_adapter: {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config, {PEFT key: tensor}, weights file) from a directory in any of the accepted layouts."""
    cfg_path, st_path, bin_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME, directory / BIN_NAME
    config = _read_json(cfg_path) if cfg_path.is_file() else None
    if st_path.is_file():
        from safetensors.torch import load_file

        try:
            state, source = load_file(st_path), st_path
        except Exception as e:  # safetensors raises its own error type on a truncated/corrupt header
            raise ValueError(f"load_adapter: {st_path} is not a valid safetensors file: {e}") from e
    elif bin_path.is_file():
        source = bin_path
        try:
            obj = torch.load(bin_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"load_adapter: {bin_path} holds objects other than tensors and plain containers; "
                             f"refusing to unpickle them (torch.load weights_only=True): {e}") from e
        except Exception as e:  # truncated or not a torch file
            raise ValueError(f"load_adapter: cannot read {bin_path}: {e}") from e
        if isinstance(obj, dict) and "lora_state_dict" in obj:  # the tutorials' legacy layout
            state, config = obj["lora_state_dict"], obj.get("config") or config
        else:
            state = obj
    else:
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} or {BIN_NAME} in {directory}")
    if config is None:
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {directory} (and no 'config' in {source.name})")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"load_adapter: {source} must hold a dict of tensors keyed by name")
    return _normalise_config(config), {_normalise_key(k): v for k, v in state.items()}, source


def _check_config(cfg: dict, where) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {where} is a {cfg['peft_type']} adapter; lora_fast loads LoRA adapters")
    bad = {f: cfg[f] for f in _UNSUPPORTED if cfg.get(f)}
    if str(cfg.get("init_lora_weights", "")).lower().startswith("mica"):
        bad["init_lora_weights"] = cfg["init_lora_weights"]
    if cfg.get("bias", "none") != "none":
        bad["bias"] = cfg["bias"]
    if bad:
        raise ValueError(f"load_adapter: {where} uses {bad}, which lora_fast does not implement; load it with "
                         "PEFT's PeftModel.from_pretrained instead")
    ranks = {"r": cfg.get("r"), **{f"rank_pattern[{k!r}]": v for k, v in (cfg.get("rank_pattern") or {}).items()}}
    alphas = {"lora_alpha": cfg.get("lora_alpha"),
              **{f"alpha_pattern[{k!r}]": v for k, v in (cfg.get("alpha_pattern") or {}).items()}}
    for field, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"load_adapter: {where}: {field} must be a positive int, got {r!r}")
    for field, alpha in alphas.items():
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ValueError(f"load_adapter: {where}: {field} must be a positive number, got {alpha!r}")
    p = cfg.get("lora_dropout", 0.0) or 0.0
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"load_adapter: {where}: lora_dropout must be in [0, 1), got {p!r}")


def _peft_targets(model: nn.Module, cfg: dict) -> list[str]:
    """Module names PEFT would wrap for this config (its ``check_target_module_exists`` rules: exclude_modules,
    modules_to_save, target_modules as a full-match regex or names/suffixes, layers_to_transform/layers_pattern)."""
    targets = _resolve_targets(model, cfg.get("target_modules"))
    if targets == "all-linear":
        targets = "|".join(re.escape(n) for n in _all_linear(model))
    exclude, to_save = cfg.get("exclude_modules"), cfg.get("modules_to_save") or []
    layers_idx, layers_pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if isinstance(layers_idx, int):
        layers_idx = [layers_idx]
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    found = []
    for name, _ in model.named_modules():
        if not name or (exclude and module_matches(name, exclude)):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in to_save) or not module_matches(name, targets):
            continue
        if layers_idx and not isinstance(targets, str):  # the first numbered segment is the layer index
            pats = ([rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in layers_pattern] if layers_pattern
                    else [r".*?\.[^.]*\.(?P<idx>\d+)\."])
            idx = next((m.group("idx") for p in pats if (m := re.match(p, name))), None)
            if idx is None or int(idx) not in layers_idx:
                continue
        found.append(name)
    return found


def _all_linear(model: nn.Module) -> list[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = classifier_head_name(model)  # PEFT leaves a SEQ_CLS head out of "all-linear"
    return [n for n, m in model.named_modules() if isinstance(m, LORA_BASE_TYPES) and m is not out and n != head]


def _in_out(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else (w.shape[0], w.shape[1])


def load_adapter(model: nn.Module, directory, strict: bool = True, backend: str | None = None) -> AdapterLoadResult:
    """Load an adapter directory (PEFT's format, or the legacy ``adapter_model.bin``) into ``model`` in place.

    A model without LoRA layers gets them injected as the config says (``target_modules``, ``r``/``rank_pattern``,
    ``lora_alpha``/``alpha_pattern``, ``use_rslora``, ``lora_dropout``; Linear and Conv1D bases). A model that
    already has LoRA layers keeps them: their weights are replaced and their alpha/rsLoRA/dropout set from the
    config. Modules in ``modules_to_save`` are loaded and made trainable, as PEFT does.

    Args:
        model: the base model (a transformers model, typically), with or without lora_fast layers.
        directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
        strict: raise on missing or unexpected keys (mis-shaped keys always raise). ``False`` loads what fits.
        backend: forwarded to the LoRA layers (None leaves existing layers' choice, ``LORA_FAST_BACKEND``).

    Returns:
        ``AdapterLoadResult(missing_keys, unexpected_keys)``, both empty after a strict load.

    Raises:
        FileNotFoundError: the directory lacks the files. ValueError: bad keys (named), unsupported config
        fields, a pickle with non-tensor objects, or merged LoRA layers (unmerge first). Nothing is modified then.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"load_adapter: {directory} is not a directory")
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter: expected an nn.Module, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise TypeError("load_adapter: this is a PEFT model; use its load_adapter(), or load into the base model")
    cfg, state, source = _read_adapter(directory)
    _check_config(cfg, source)
    existing = lora_layers(model)
    merged = [n for n, m in existing.items() if m.merged]
    if merged:
        raise ValueError(f"load_adapter: LoRA layers are merged ({_names(merged)}); call unmerge_lora(model) first")

    plan = {}  # module name -> (in, out, r, alpha)
    names = list(existing) if existing else _peft_targets(model, cfg)
    if not names:
        raise ValueError(f"load_adapter: target_modules {cfg.get('target_modules')!r} of {source} match no module "
                         f"of {type(model).__name__}")
    for name in names:
        module = existing[name] if name in existing else model.get_submodule(name)
        if not isinstance(module, (LinearWithLoRA,) + LORA_BASE_TYPES):
            raise ValueError(f"load_adapter: target {name!r} is a {type(module).__name__}; lora_fast supports "
                             "nn.Linear and transformers' Conv1D (load this adapter with PEFT)")
        in_f, out_f = (module.in_features, module.out_features) if name in existing else _in_out(module)
        r = module.rank if name in existing else pattern_value(cfg.get("rank_pattern"), name, cfg["r"])
        plan[name] = (in_f, out_f, r, pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
    lora_names = list(plan)
    expected = {}
    for name, (in_f, out_f, r, _) in plan.items():
        expected[f"{PREFIX}{name}.lora_A.weight"] = (r, in_f)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (out_f, r)
    to_save = cfg.get("modules_to_save") or []
    extras = [n for n in _candidate_names(model, lora_names) if any(module_matches(n, [m]) for m in to_save)]
    extras = [n for n in extras if not any(n.startswith(f"{e}.") for e in extras)]  # outermost only
    for owner in extras:
        for k, v in model.get_submodule(owner).state_dict().items():
            expected[f"{PREFIX}{owner}.{k}"] = tuple(v.shape)

    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    misshaped = [f"{k} (expected {expected[k]}, file has {tuple(v.shape)})"
                 for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    misshaped += [f"{k} (dtype {v.dtype} is not floating point)"
                  for k, v in state.items() if k in expected and not v.is_floating_point()]
    if misshaped:
        raise ValueError(f"load_adapter: {len(misshaped)} mis-shaped key(s) in {source}: {_names(misshaped)}")
    if strict and (missing or unexpected):
        raise ValueError(
            f"load_adapter: {source} does not fit {type(model).__name__} "
            f"(strict=True; pass strict=False to load what fits). "
            + (f"Missing {len(missing)} key(s): {_names(missing)}. " if missing else "")
            + (f"Unexpected {len(unexpected)} key(s): {_names(unexpected)}." if unexpected else "")
        )

    # Checks done: from here on the model is modified.
    use_rslora, dropout = bool(cfg.get("use_rslora", False)), float(cfg.get("lora_dropout", 0.0) or 0.0)
    if backend is not None:
        resolve_backend(backend)  # before the model is touched
    new_layers = {}  # built (bases checked) before anything is replaced
    for name, (_, _, r, alpha) in plan.items():
        if name not in existing:
            base = model.get_submodule(name)
            layer = LinearWithLoRA(base, rank=r, alpha=float(alpha), dropout=dropout, use_rslora=use_rslora,
                                   backend=backend)
            new_layers[name] = layer.train(base.training)  # an eval model stays in eval mode
    for name, (_, _, _r, alpha) in plan.items():
        if name in existing:
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
    params = {}
    for name in lora_names:
        lora = model.get_submodule(name).lora
        params[f"{PREFIX}{name}.lora_A.weight"], params[f"{PREFIX}{name}.lora_B.weight"] = lora.lora_A, lora.lora_B
    for owner in extras:
        module = model.get_submodule(owner)
        params.update({f"{PREFIX}{owner}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
        module.requires_grad_(True)
    with torch.no_grad():
        for k, v in state.items():
            if k in params:
                params[k].copy_(v.to(params[k].device))
    return AdapterLoadResult(missing, unexpected)
