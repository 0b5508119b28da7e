"""Activation checkpointing of an adapted transformers model: the gradients must reach every LoRA weight.

Reentrant checkpointing (``torch.utils.checkpoint`` with ``use_reentrant=True``, transformers 4's default and the
Trainer's) gives a block's output a gradient only when one of the block's tensor inputs requires grad. With the
base frozen, nothing before the first block requires grad, so every LoRA weight inside a checkpointed block gets
no gradient at all — torch warns "None of the inputs have requires_grad=True" and training goes on with the head
alone (or stops with "does not require grad" when nothing else trains).

The remedy is a forward hook that makes the input embeddings' output require grad (transformers'
``enable_input_require_grads``). PEFT's ``get_peft_model`` calls that when checkpointing is already on, and
transformers' own ``*_checkpointing_enable`` does it for ``input_ids`` models (transformers >= 5) or for adapters
it loaded itself. Neither covers the usual order — the adapter first, then ``gradient_checkpointing_enable()`` (the
Trainer's ``gradient_checkpointing=True``) — on a vision or audio model, or on any model under transformers 4, whose
``enable_input_require_grads`` also looks only at the top model's embeddings (CLIP and Wav2Vec2 raise there;
Whisper's encoder is missed).

So ``watch_checkpointing`` registers a forward pre-hook on the transformers model: whenever it runs in training
with grad enabled and reentrant checkpointing switched on, and no such hook is in place, lora_fast adds one to the
input embeddings of every transformers model inside (as transformers 5 does), under transformers' own attribute
names, so that ``disable_input_require_grads()`` removes them. Non-reentrant checkpointing needs none: it is left
alone. The switch is read from one module (transformers sets every module's at once), recorded when the pre-hook
is registered.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn

QUANTISED_FLAGS = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
FLAG = "gradient_checkpointing"  # transformers' per-module switch (every module that has it is set at once)
PROBE = "_lora_fast_checkpointing_probe"  # the name of the first module with the switch, read by the hook
ADDED = "_lora_fast_input_grads_added"  # set once the input embeddings' hook was asked for


def _switch_holder(model: nn.Module) -> str | None:
    """The name of the first module (pre-order, so the outermost stack) that has transformers' switch, if any."""
    return next((name for name, m in model.named_modules() if hasattr(m, FLAG)), None)


def _switch_of(model: nn.Module) -> nn.Module | None:
    """The module recorded by ``watch_checkpointing`` (no get_submodule: its raise would break graphs)."""
    holder = model
    for part in filter(None, getattr(model, PROBE, "").split(".")):
        holder = getattr(holder, part, None)
    return holder if isinstance(holder, nn.Module) and hasattr(holder, FLAG) else None


def checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' checkpointing switch is on in ``model`` (read from the module recorded by
    ``watch_checkpointing``; every module is scanned when that name no longer resolves)."""
    holder = _switch_of(model)
    if holder is not None:
        return getattr(holder, FLAG) is True
    return any(getattr(m, FLAG, False) is True for m in model.modules())


def _reentrant_checkpointing_on(model: nn.Module) -> bool:
    """``checkpointing_on``, unless transformers checkpoints with ``use_reentrant=False`` (its
    ``_gradient_checkpointing_func`` is a partial of torch's checkpoint with that keyword): then nothing needs an
    input that requires grad, and making the embeddings' output require it would only add a backward through the
    first block's input. Unknown (no recorded switch, no such partial): counted as reentrant."""
    holder = _switch_of(model)
    if holder is None:
        return checkpointing_on(model)
    keywords = getattr(getattr(holder, "_gradient_checkpointing_func", None), "keywords", None)
    return getattr(holder, FLAG) is True and not (isinstance(keywords, dict) and keywords.get("use_reentrant") is False)


def _outputs_require_grad(module: nn.Module, inputs, output) -> None:
    """Forward hook on input embeddings (module-level: a model carrying it still pickles). A tuple output (Swin's
    patch embeddings return the embeddings and their shape): its first floating tensor."""
    for t in output if isinstance(output, (tuple, list)) else (output,):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            if not t.requires_grad:
                t.requires_grad_(True)
            return


class _AllHandles:
    """``_require_grads_hook`` for transformers 4, whose ``disable_input_require_grads`` removes only that one
    handle: removing it removes every hook lora_fast added (module-level: picklable)."""

    def __init__(self, handles):
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _input_grad_hooks(model: nn.Module) -> list:
    """For every transformers model inside ``model`` (itself included): a hook on its input embeddings (CLIP's two
    towers, Whisper's encoder conv1 and decoder embeddings: what transformers 5's ``enable_input_require_grads``
    covers; transformers 4 looks at the top model only, where CLIP and Wav2Vec2 raise NotImplementedError). One
    without input embeddings (Wav2Vec2, also as the encoder of a SpeechEncoderDecoderModel) gets a pre-hook on each
    of its modules with the checkpointing switch that holds a LoRA layer (not the frozen feature encoder, whose
    backward would be wasted). Returns the handles."""
    from transformers import PreTrainedModel

    from lora_fast.layer import LinearWithLoRA

    handles, seen = [], set()
    for sub in model.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        try:
            emb = sub.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            if id(emb) not in seen:
                seen.add(id(emb))
                handles.append(emb.register_forward_hook(_outputs_require_grad))
            continue
        for m in sub.modules():
            if hasattr(m, FLAG) and id(m) not in seen and any(isinstance(x, LinearWithLoRA) for x in m.modules()):
                seen.add(id(m))
                handles.append(m.register_forward_pre_hook(_hidden_states_require_grad, with_kwargs=True))
    return handles


_HIDDEN = ("hidden_states", "inputs_embeds")


@functools.cache
def _positional_names(cls: type) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(cls.forward).parameters)[1:]  # after self
    except (TypeError, ValueError):
        return ()


def _hidden_states_require_grad(module: nn.Module, args, kwargs):
    """Forward pre-hook on a module with the checkpointing switch (module-level: picklable), for models without
    input embeddings: its ``hidden_states`` / ``inputs_embeds`` input (by name, positional or keyword), when it
    requires no grad, goes on as a detached copy that does — the caller's tensor is not changed, and nothing else
    (masks, raw audio or pixel values) is made to require grad."""
    def lift(t):
        return t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() \
            and not t.requires_grad else t

    names = _positional_names(type(module))
    args = tuple(lift(a) if i < len(names) and names[i] in _HIDDEN else a for i, a in enumerate(args))
    return args, {k: lift(v) if k in _HIDDEN else v for k, v in kwargs.items()}


@torch.compiler.disable
def _add_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, once per model: never again after the user's
    ``disable_input_require_grads()`` (``ADDED`` stays set), and not where transformers' own hook is in place
    (transformers 5 adds it for ``input_ids`` models): ``_input_grad_hooks``. The handles go where transformers
    keeps its own, so ``disable_input_require_grads()`` removes them (all of them, in transformers 4 too). Runs
    eagerly under torch.compile (a graph break, once: ``ADDED`` then keeps the hook out of the graph)."""
    if getattr(model, ADDED, False):
        return
    setattr(model, ADDED, True)
    if model.__dict__.get("_require_grads_hook") is not None or model.__dict__.get("_require_grads_hooks"):
        return
    handles = _input_grad_hooks(model)
    if handles:  # where transformers keeps its own hooks: disable_input_require_grads() removes them
        model._require_grads_hooks = handles
        model._require_grads_hook = _AllHandles(handles)


def _adapted_transformers_models(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers models inside ``model`` (not itself one) that hold a LoRA layer: the backbones of
    a user's wrapper that train (a frozen teacher or conditioning encoder beside them is left alone)."""
    from transformers import PreTrainedModel

    from lora_fast.layer import LinearWithLoRA

    found: dict[str, nn.Module] = {}  # pre-order: an outer model comes before the ones inside it
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(f"{o}.") for o in found):
            found[name] = m
    return [m for m in found.values() if any(isinstance(x, LinearWithLoRA) for x in m.modules())]


def _input_grads_when_checkpointing(model: nn.Module, args) -> None:
    """Forward pre-hook (module-level, so that deepcopy and pickling keep it bound to the right model). About
    2 µs per training forward while checkpointing is off (GPT-2 124M, one CPU core), 0.1 µs once it was handled;
    under torch.compile it adds guards on these attributes, not graph breaks."""
    if model.training and torch.is_grad_enabled() and not getattr(model, ADDED, False) \
            and _reentrant_checkpointing_on(model):
        _add_input_grads(model)


def watch_checkpointing(model: nn.Module) -> None:
    """Make the input embeddings' output require grad whenever ``model`` (a transformers model, or a user's module
    holding one — a backbone under its own head —, after ``unwrap_model``) trains with reentrant checkpointing on —
    now, or after checkpointing is switched on later.

    Not for quantised models (PEFT leaves those to ``prepare_model_for_kbit_training``), nor for models without a
    checkpointing switch. Registered once per model; once the embeddings' hook was added (or found in place), the
    user's ``disable_input_require_grads()`` is respected: it is not added again."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # no transformers: no transformers checkpointing switch to watch
        return
    if not isinstance(model, PreTrainedModel):  # a user's module: each adapted backbone inside, with its own switch
        for backbone in _adapted_transformers_models(model):
            watch_checkpointing(backbone)
        return
    if any(getattr(model, a, False) for a in QUANTISED_FLAGS):
        return
    holder = _switch_holder(model)
    if holder is None:
        return
    setattr(model, PROBE, holder)
    if not any(h is _input_grads_when_checkpointing for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_input_grads_when_checkpointing)
    if _reentrant_checkpointing_on(model):
        _add_input_grads(model)  # now, as PEFT does


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """transformers' activation checkpointing on ``model`` (or the transformers model inside a DDP or
    torch.compile wrapper), by the name its version has (``gradient_checkpointing_enable`` warns in transformers
    5), with ``use_cache`` off as transformers' own training turns it off; the LoRA layers inside are recomputed
    with the same dropout masks (regenerated from their seeds).

    Raises:
        ValueError: the model does not support it (transformers' ``supports_gradient_checkpointing``).
    """
    from lora_fast.inject import unwrap_model

    model = unwrap_model(model)  # DDP, torch.compile: the transformers model inside
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
