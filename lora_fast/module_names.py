"""Module names without pass-through wrappers, as adapter files and ``state_dict()`` spell them.

Some wrappers put a segment into every module name below them without changing any parameter:
    torch's activation-checkpoint / offload wrapper  ``_checkpoint_wrapped_module``
        (``apply_activation_checkpointing``; accelerate's FSDP plugin and torchtitan-style recipes use it);
    ``torch.compile`` of a submodule                  ``_orig_mod``.
``model.state_dict()`` leaves the first out (the wrapper registers a hook for it) and PEFT's files are keyed by the
plain model's names, so an adapter saved with ``transformer.h.0._checkpoint_wrapped_module.attn.c_attn`` would be
silently ignored by PEFT (it warns about missing keys and runs the base model). ``plain_module_names`` takes such
wrappers out of the module tree for the duration of a save or load, and puts each back afterwards around whatever
its slot then holds (a LoRA layer that ``load_adapter`` put there).

FSDP1 (``FullyShardedDataParallel``, segment ``_fsdp_wrapped_module``) is not pass-through: its parameters are
flattened and sharded, and lora_fast does not gather them. It is refused by name (``FSDP1_SEGMENT``); FSDP2
(``fully_shard``) keeps the module tree and is supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn

CHECKPOINT_SEGMENT = "_checkpoint_wrapped_module"
COMPILE_SEGMENT = "_orig_mod"
FSDP1_SEGMENT = "_fsdp_wrapped_module"


def wrapper_inner(module: nn.Module) -> str | None:
    """The attribute holding the wrapped module when ``module`` is a pass-through wrapper, else None."""
    compiled = any(c.__name__ == "OptimizedModule" for c in type(module).__mro__)  # FSDP2 subclasses it
    if compiled and isinstance(module._modules.get(COMPILE_SEGMENT), nn.Module):
        return COMPILE_SEGMENT
    if isinstance(module._modules.get(CHECKPOINT_SEGMENT), nn.Module):
        return CHECKPOINT_SEGMENT
    return None


def plain_name(name: str) -> str:
    """``name`` without the segments pass-through wrappers add (``a._checkpoint_wrapped_module.b`` → ``a.b``): how
    adapter files, ``state_dict()`` and the names lora_fast records (``modules_to_save``) spell it."""
    return ".".join(p for p in name.split(".") if p not in (CHECKPOINT_SEGMENT, COMPILE_SEGMENT))


def check_no_fsdp1(model: nn.Module, who: str) -> None:
    """Refuse a model holding FSDP1 wrappers (flat, sharded parameters: names and tensors would both be wrong)."""
    inside = [n for n, _ in model.named_modules() if n == FSDP1_SEGMENT or f".{FSDP1_SEGMENT}" in f".{n}"]
    if inside or type(model).__name__ == "FullyShardedDataParallel":
        raise ValueError(f"{who}: the model is wrapped in FSDP1 (FullyShardedDataParallel), whose flattened, sharded "
                         "parameters lora_fast does not gather; shard it with FSDP2 (torch.distributed.fsdp."
                         "fully_shard; accelerate: fsdp_version: 2), which lora_fast saves and loads on every rank")


@contextlib.contextmanager
def plain_module_names(model: nn.Module) -> Iterator[set[int]]:
    """Within: every pass-through wrapper below ``model`` is replaced in its parent by the module it wraps (nested
    ones too), so ``named_modules()`` gives the plain names. Yields the ids of the modules that ``torch.compile``
    wraps directly: their compiled forward is bound to them, so they must not be replaced (``load_adapter`` refuses
    them as new targets). On exit each wrapper goes back into its slot, now wrapping what the slot holds then (the
    same module, or the LoRA layer put there in its place).

    Not for use while another thread runs the model: the tree is changed in place for the duration.
    """
    swapped: list[tuple[nn.Module, str, nn.Module, str]] = []  # (parent, slot, wrapper, inner attribute)
    try:
        pending = [model]
        while pending:
            parent = pending.pop()
            for slot, child in list(parent._modules.items()):
                while child is not None and (attr := wrapper_inner(child)) is not None:
                    swapped.append((parent, slot, child, attr))
                    child = child._modules[attr]
                    parent._modules[slot] = child
                if child is not None:
                    pending.append(child)
        yield {id(w._modules[a]) for _, _, w, a in swapped if a == COMPILE_SEGMENT}
    finally:
        for parent, slot, wrapper, attr in reversed(swapped):
            now = parent._modules[slot]
            if wrapper._modules[attr] is not now and attr == COMPILE_SEGMENT:
                continue  # cannot happen through load_adapter; the slot keeps the new module, uncompiled
            wrapper._modules[attr] = now
            parent._modules[slot] = wrapper
