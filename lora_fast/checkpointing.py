"""Activation checkpointing of an adapted transformers model: the gradients must reach every LoRA weight.

Reentrant checkpointing (``torch.utils.checkpoint`` with ``use_reentrant=True``, transformers 4's default and the
Trainer's) gives a block's output a gradient only when one of the block's tensor inputs requires grad. With the
base frozen, nothing before the first block requires grad, so every LoRA weight inside a checkpointed block gets
no gradient at all — torch warns "None of the inputs have requires_grad=True" and training goes on with the head
alone (or stops with "does not require grad" when nothing else trains).

The remedy is transformers' ``enable_input_require_grads``: a hook that makes the input embeddings' output
require grad. PEFT's ``get_peft_model`` calls it when checkpointing is already on, and transformers' own
``*_checkpointing_enable`` calls it for ``input_ids`` models (transformers >= 5) or for adapters it loaded itself.
Neither covers the usual order — the adapter first, then ``gradient_checkpointing_enable()`` (the Trainer's
``gradient_checkpointing=True``) — on a vision or audio model, or on any model under transformers 4.

So ``watch_checkpointing`` registers a forward pre-hook on the transformers model: whenever it runs in training
with grad enabled and checkpointing switched on, and the input-embeddings hook is not there, it is added. The
switch is read from one module (transformers sets every module's at once), recorded when the hook is registered.
"""

from __future__ import annotations

import torch
import torch.nn as nn

QUANTISED_FLAGS = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
FLAG = "gradient_checkpointing"  # transformers' per-module switch (every module that has it is set at once)
PROBE = "_lora_fast_checkpointing_probe"  # the name of the first module with the switch, read by the hook
ADDED = "_lora_fast_input_grads_added"  # set once the input embeddings' hook was asked for


def _switch_holder(model: nn.Module) -> str | None:
    """The name of the first module (pre-order, so the outermost stack) that has transformers' switch, if any."""
    return next((name for name, m in model.named_modules() if hasattr(m, FLAG)), None)


def checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' checkpointing switch is on in ``model`` (read from the module recorded by
    ``watch_checkpointing``; every module is scanned when that name no longer resolves)."""
    holder = model
    for part in filter(None, getattr(model, PROBE, "").split(".")):  # no get_submodule: its raise breaks graphs
        holder = getattr(holder, part, None)
    if isinstance(holder, nn.Module) and hasattr(holder, FLAG):
        return getattr(holder, FLAG) is True
    return any(getattr(m, FLAG, False) is True for m in model.modules())


@torch.compiler.disable
def _add_input_grads(model: nn.Module) -> None:
    """transformers' hook, once: never again after the user's ``disable_input_require_grads()`` (the removed
    handle stays in place), nor on every forward of a model without input embeddings (no handle at all). Run
    eagerly under torch.compile (a graph break, once: the flag it sets then keeps the hook out of the graph)."""
    if "_require_grads_hook" not in model.__dict__ and not getattr(model, ADDED, False):
        model.enable_input_require_grads()
    setattr(model, ADDED, True)


def _input_grads_when_checkpointing(model: nn.Module, args) -> None:
    """Forward pre-hook (module-level, so that deepcopy and pickling keep it bound to the right model). About
    2 µs per training forward while checkpointing is off (GPT-2 124M, one CPU core), 0.1 µs once it was handled;
    under torch.compile it adds guards on these attributes, not graph breaks."""
    if model.training and torch.is_grad_enabled() and not getattr(model, ADDED, False) and checkpointing_on(model):
        _add_input_grads(model)


def watch_checkpointing(model: nn.Module) -> None:
    """Make the input embeddings' output require grad whenever ``model`` (a transformers model, after
    ``unwrap_model``) trains with checkpointing on — now, or after checkpointing is switched on later.

    Not for quantised models (PEFT leaves those to ``prepare_model_for_kbit_training``), nor for models without
    ``enable_input_require_grads`` or without a checkpointing switch. Registered once per model; the user's
    ``disable_input_require_grads()`` is respected (transformers leaves the removed handle in place, so the hook
    does not add it again)."""
    if not callable(getattr(model, "enable_input_require_grads", None)):
        return
    if any(getattr(model, a, False) for a in QUANTISED_FLAGS):
        return
    holder = _switch_holder(model)
    if holder is None:
        return
    setattr(model, PROBE, holder)
    if not any(h is _input_grads_when_checkpointing for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_input_grads_when_checkpointing)
    if checkpointing_on(model):
        _add_input_grads(model)  # now, as PEFT does


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """transformers' activation checkpointing on ``model``, by the name its version has (``gradient_checkpointing_
    enable`` warns in transformers 5), with ``use_cache`` off as transformers' own training turns it off; the LoRA
    layers inside are recomputed with the same dropout masks (regenerated from their seeds).

    Raises:
        ValueError: the model does not support it (transformers' ``supports_gradient_checkpointing``).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing "
                         "(transformers' supports_gradient_checkpointing is False)")
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # a cache built while blocks are replayed would grow twice
