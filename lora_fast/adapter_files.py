"""The files of an adapter directory: atomic writing, reading in every accepted layout, gathering sharded tensors.

Writes are atomic: both files go to temporary files in the target directory (fsync'ed), then ``os.replace``
puts them in place, so an interrupted save leaves the previous adapter intact. The config is the commit marker: it
is renamed last, and an old config that differs from the new one is removed before the weights are replaced. So
the two renames' window (microseconds) leaves either the previous adapter whole or a directory without
``adapter_config.json`` (refused on load, naming the file) — never new weights beside an old config, which would
load with the old alpha (a silently wrong model). A save whose config is unchanged (a rewrite of the same adapter's
weights: checkpoints of one run) renames the weights alone: one atomic step. Directories the save created are
removed again when it fails.

Besides the safetensors file, ``adapter_model.bin`` is read with ``torch.load(weights_only=True)`` (no arbitrary
unpickling) in two forms: PEFT's plain state dict (keys ``base_model.model.<module>.lora_A.weight``, ...), or the
tutorials' ``{'lora_state_dict': {...}, 'config': {...}}`` whose keys are lora_fast state-dict keys
``<module>.lora.lora_A`` / ``<module>.lora.lora_B`` and whose config is ``model.lora_fast_config``
(``rank``/``alpha``/``dropout``/``use_rslora``/``target_modules``) or PEFT's field names. Both are normalised to
PEFT's keys and field names. A legacy file's own config and an ``adapter_config.json`` beside it must make the same
adapter of the model (``load_adapter`` compares what each resolves to), or loading is refused: neither is silently
preferred.

Sharded (FSDP2) parameters are DTensors: ``_gather_full`` gathers each one (``DTensor.full_tensor()``, a collective,
so every rank must call it in the same order) into a plain CPU tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# PEFT 0.21 LoraConfig defaults of the fields load_adapter reads without a default of its own (the others --
# lora_dropout 0.0, use_rslora False, bias "none", rank_pattern/alpha_pattern {}, modules_to_save None, ... -- are
# read with their PEFT default already).
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}


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


def _normalise_config(cfg: dict) -> dict:
    """Accept ``lora_fast_config`` names (rank/alpha/dropout) beside PEFT's (r/lora_alpha/lora_dropout); an omitted
    ``r``/``lora_alpha`` takes PEFT's default (8), as ``LoraConfig`` does."""
    cfg = dict(cfg)
    for ours, peft in (("rank", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        if ours in cfg and peft not in cfg:
            cfg[peft] = cfg.pop(ours)
    cfg.setdefault("peft_type", "LORA")
    for field, default in PEFT_DEFAULTS.items():  # fields PEFT's LoraConfig fills in when a config omits them
        cfg.setdefault(field, default)
    return cfg


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"load_adapter: cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"load_adapter: {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor], Path, dict | None]:
    """(config, {PEFT key: tensor}, weights file, second config) from a directory in any of the accepted layouts.
    The second config is the ``adapter_config.json`` beside a legacy .bin that carries its own config (the one
    returned first); ``load_adapter`` checks that both make the same adapter of the model."""
    cfg_path, st_path, bin_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME, directory / BIN_NAME
    config = _read_json(cfg_path) if cfg_path.is_file() else None
    second = None
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
            state, embedded = obj["lora_state_dict"], obj.get("config")
            if embedded and config is not None:  # two configs for one set of weights: they must agree
                second = _normalise_config(config)
            config = embedded or config
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
    return _normalise_config(config), {_normalise_key(k): v for k, v in state.items()}, source, second
