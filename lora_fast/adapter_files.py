"""The files of an adapter directory: atomic writing, reading in every accepted layout, gathering sharded tensors.

Writes are atomic: both files go to temporary files in the target directory (fsync'ed), then ``os.replace``
puts them in place, so an interrupted save leaves the previous adapter intact. The config is the commit marker: it
is renamed last, and an old config that differs from the new one is removed before the weights are replaced. So
the two renames' window (microseconds) leaves either the previous adapter whole or a directory without
``adapter_config.json`` (refused on load, naming the file) — never new weights beside an old config, which would
load with the old alpha (a silently wrong model). A save whose config is unchanged (a rewrite of the same adapter's
weights: checkpoints of one run) renames the weights alone: one atomic step. Directories the save created are
removed again when it fails. A target path that is a directory (a rename onto it would fail after the old config
is gone) is refused before anything is written.

Besides the safetensors file, ``adapter_model.bin`` is read with ``torch.load(weights_only=True)`` (no arbitrary
unpickling) in two forms: PEFT's plain state dict (keys ``base_model.model.<module>.lora_A.weight``, ...), or the
tutorials' ``{'lora_state_dict': {...}, 'config': {...}}`` whose keys are lora_fast state-dict keys
``<module>.lora.lora_A`` / ``<module>.lora.lora_B`` and whose config is ``model.lora_fast_config``
(``rank``/``alpha``/``dropout``/``use_rslora``/``target_modules``) or PEFT's field names. Both are normalised to
PEFT's keys and field names; a file spelling one tensor both ways is refused (which one was meant is unknown). The
``rank``/``alpha``/``dropout`` names are read in that embedded config only: in ``adapter_config.json`` PEFT ignores
them (taking its own defaults), so a JSON config using them is refused rather than read otherwise than PEFT reads
it. A legacy file's own config and an ``adapter_config.json`` beside it must make the same adapter of the model
(``load_adapter`` compares what each resolves to), or loading is refused: neither is silently preferred. Errors name
the config they come from (the JSON file, or ``<bin> ['config']``).

Sharded (FSDP2) parameters are DTensors: ``_gather_full`` gathers each one (``DTensor.full_tensor()``, a collective,
so every rank must call it in the same order) into a plain CPU tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# PEFT 0.21 LoraConfig defaults of the fields load_adapter reads without a default of its own (the others --
# lora_dropout 0.0, use_rslora False, bias "none", rank_pattern/alpha_pattern {}, modules_to_save None, ... -- are
# read with their PEFT default already).
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
# model.lora_fast_config's names of PEFT's fields, read in a legacy .bin's embedded config (never in the JSON file)
LEGACY_ALIASES = (("rank", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout"))


# ---------------------------------------------------------------------------------------------------------- write
def _write_file(fh, data: bytes) -> None:
    """Write ``data`` to an open temporary file (a seam for tests simulating an interrupted save)."""
    fh.write(data)


def write_adapter_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write an adapter's files into ``directory`` (created if needed; what this call created is removed again
    if it fails), atomically: ``files``' last entry is the commit marker (the config), renamed last."""
    created = [d for d in (directory, *directory.parents) if not d.exists()]  # deepest first
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _atomic_write_all(directory, files)
    except BaseException:
        if created:  # a directory this call made holds only what it renamed in: take that out too
            for name in files:
                (directory / name).unlink(missing_ok=True)
        for d in created:
            try:
                d.rmdir()  # only if still empty: never anything a concurrent writer put there
            except OSError:
                break
        raise


def _atomic_write_all(directory: Path, files: dict[str, bytes]) -> None:
    """Write every file to a fsync'ed temporary in ``directory`` first, then rename them into place, the last
    (the commit marker) last; an existing marker that differs is removed before the first rename, and an
    unchanged one is left as it is (module docstring)."""
    temps: dict[str, str] = {}
    umask = os.umask(0o022)  # mkstemp creates 0600 files; give them the mode a plain open() would
    os.umask(umask)
    marker = list(files)[-1]
    # Before anything is written or removed: a rename onto a directory fails (IsADirectoryError), and failing after
    # the old marker is unlinked would leave the previous adapter without its config.
    blocked = [str(directory / n) for n in files if (directory / n).is_dir() and not (directory / n).is_symlink()]
    if blocked:
        raise IsADirectoryError(f"save_adapter: {', '.join(blocked)}: a directory where the adapter's file of that "
                                "name goes; move or remove it and save again (nothing was written: what the directory "
                                "held is left as it was)")
    try:
        for name, data in files.items():
            if name == marker and _same_bytes(directory / name, data):
                continue
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            temps[name] = tmp
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as fh:
                _write_file(fh, data)
                fh.flush()
                os.fsync(fh.fileno())
        if marker in temps and len(temps) > 1:  # the old marker must not outlive the files it described
            (directory / marker).unlink(missing_ok=True)
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


def _same_bytes(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a file holding exactly ``data`` (size first: most changes stop there)."""
    try:
        return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


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


# ----------------------------------------------------------------------------------------------------------- read
def _normalise_key(key: str) -> str:
    """lora_fast state-dict keys (``<m>.lora.lora_A``) → PEFT keys; anything else is kept as it is."""
    for ab in ("A", "B"):
        if key.endswith(f".lora.lora_{ab}") and not key.startswith(PREFIX):
            return f"{PREFIX}{key[: -len(f'.lora.lora_{ab}')]}.lora_{ab}.weight"
    return key


def _normalise_keys(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """``state`` with PEFT's keys (``_normalise_key``). Two keys naming one tensor (``<m>.lora.lora_B`` and
    ``base_model.model.<m>.lora_B.weight``) are refused: keeping either would be a guess at what the file means."""
    out, spelled = {}, {}
    for key, value in state.items():
        peft_key = _normalise_key(key)
        if peft_key in out:
            raise ValueError(f"load_adapter: {source} holds {spelled[peft_key]!r} and {key!r}, two spellings of one "
                             f"tensor ({peft_key}); which of them belongs to the adapter is unknown: rewrite the file "
                             "with one of them")
        out[peft_key], spelled[peft_key] = value, key
    return out


def _normalise_config(cfg: dict, where, legacy: bool) -> dict:
    """PEFT's field names, and PEFT's defaults (8) for an omitted ``r``/``lora_alpha``, as ``LoraConfig`` gives.

    A ``legacy`` config (a .bin's embedded ``model.lora_fast_config``) may use lora_fast's names rank/alpha/dropout
    for r/lora_alpha/lora_dropout. An ``adapter_config.json`` may not: PEFT ignores those names there (with a
    warning) and takes its defaults, so reading them would load another adapter than PEFT loads from the same
    directory; the config (``where``) is refused, naming the fields to rename. Where both names are given, PEFT's is
    read (the other is warned about as an unknown field), as in PEFT."""
    cfg = dict(cfg)
    aliased = [(ours, peft) for ours, peft in LEGACY_ALIASES if ours in cfg and peft not in cfg]
    if aliased and not legacy:
        defaults = {**PEFT_DEFAULTS, "lora_dropout": 0.0}
        given = ", ".join(f"{o}={cfg[o]!r}" for o, _ in aliased)
        renames = ", ".join(f"{o!r} to {p!r}" for o, p in aliased)
        raise ValueError(f"load_adapter: {where} sets {given}, lora_fast's name(s) for "
                         f"{', '.join(p for _, p in aliased)}; PEFT reads r / lora_alpha / lora_dropout in "
                         f"{CONFIG_NAME}, ignores these and takes its defaults "
                         f"({', '.join(f'{p}={defaults[p]}' for _, p in aliased)}), so PEFT and lora_fast would load "
                         f"different adapters from this directory; rename {renames}")
    for ours, peft in aliased:
        cfg[peft] = cfg.pop(ours)
    cfg.setdefault("peft_type", "LORA")
    for field, default in PEFT_DEFAULTS.items():  # fields PEFT's LoraConfig fills in when a config omits them
        cfg.setdefault(field, default)
    return cfg


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8 (RFC 8259), whatever the locale
    except (OSError, ValueError) as e:
        raise ValueError(f"load_adapter: cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"load_adapter: {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


class AdapterRead(NamedTuple):
    """What ``_read_adapter`` found. ``where`` names the config's origin for error messages: the JSON file, or
    ``<bin> ['config']`` for a legacy .bin's embedded config. ``second`` is the ``adapter_config.json`` beside a
    legacy .bin carrying its own config; ``load_adapter`` checks that both make the same adapter of the model."""

    config: dict
    state: dict[str, torch.Tensor]
    source: Path
    second: dict | None
    where: str


def _load_error(e: BaseException) -> str:
    """torch.load's error in one line (``lora-fast merge`` prints an error as one line): a weights-only refusal's
    reason ("Unsupported global: ..."), which a paragraph of torch's advice over several lines surrounds; another
    error's first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            return reason or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0] if lines else type(e).__name__


def _read_adapter(directory: Path) -> AdapterRead:
    """(config, {PEFT key: tensor}, weights file, second config, where the config comes from) from a directory in
    any of the accepted layouts (``AdapterRead``)."""
    cfg_path, st_path, bin_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME, directory / BIN_NAME
    config = _read_json(cfg_path) if cfg_path.is_file() else None
    where, legacy, second = str(cfg_path), False, None
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
                             f"refusing to unpickle them (torch.load weights_only=True): {_load_error(e)}") from e
        except Exception as e:  # truncated or not a torch file
            raise ValueError(f"load_adapter: cannot read {bin_path}: {_load_error(e)}") from e
        if isinstance(obj, dict) and "lora_state_dict" in obj:  # the tutorials' legacy layout
            state, embedded = obj["lora_state_dict"], obj.get("config")
            if embedded is not None and not isinstance(embedded, dict):  # dict() would read a list of pairs
                raise ValueError(f"load_adapter: {bin_path}: its 'config' is a {type(embedded).__name__}, not a dict "
                                 "of LoRA settings (model.lora_fast_config, or PEFT's field names); save it as a "
                                 f"dict, or leave 'config' out and put an {CONFIG_NAME} beside the file")
            if embedded:
                if config is not None:  # two configs for one set of weights: they must agree
                    second = _normalise_config(config, cfg_path, legacy=False)
                config, where, legacy = embedded, f"{bin_path} ['config']", True
        else:
            state = obj
    else:
        hint = ""
        if (directory / "model.safetensors").is_file() or list(directory.glob("model-*-of-*.safetensors")):
            hint = (" (it holds a full model's weights: a Trainer.save_model / save_pretrained of a model with LoRA "
                    "layers in place; write the adapter with lora_fast.save_adapter(model, dir))")
        elif inner := sorted(d.name for d in directory.iterdir() if (d / CONFIG_NAME).is_file()):
            hint = (f" (it holds adapter directories: {', '.join(inner)}; PEFT saves an adapter named other than "
                    "'default' in a subdirectory of that name: load that directory)")
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} or {BIN_NAME} in {directory}{hint}")
    if config is None:
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {directory} (and no 'config' in {source.name})")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"load_adapter: {source} must hold a dict of tensors keyed by name")
    return AdapterRead(_normalise_config(config, where, legacy), _normalise_keys(state, source), source, second,
                       where)
