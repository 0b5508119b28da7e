"""One line to accelerate existing PEFT code: ``patch_peft(peft_model)`` / ``unpatch_peft(peft_model)``.

``patch_peft`` switches every supported PEFT LoRA layer to ``FastLoraLinear`` (a subclass of PEFT's ``lora.Linear``
whose only change is ``forward``; the instance's ``__class__`` is swapped in place) that computes

    y = base(x) + scaling[a]·(dropout_a(x)·A[a]ᵀ)·B[a]ᵀ          (a = the one active adapter)

with ``lora_fast.functional.lora_linear`` — the fused kernels where they run — reading the layer's own tensors at
call time (``base_layer.weight``/``bias``, ``lora_A[a].weight``, ``lora_B[a].weight``, ``scaling[a]``, the
``lora_dropout[a]`` probability and training flag). Nothing is copied: the optimizer, ``state_dict`` and
``save_pretrained`` see the same parameters as before; ``unpatch_peft`` swaps PEFT's class back. A class (not a
bound method stored on the instance) keeps patched models picklable and ``nn.DataParallel`` replicas correct.

Supported: ``peft.tuners.lora.layer.Linear`` over nn.Linear or transformers' Conv1D (``fan_in_fan_out``), plain
LoRA, exactly one active adapter, with or without dropout. Layers of other classes (embeddings, convolutions,
quantised bases: bitsandbytes, GPTQ, ...), over other bases, or whose ``forward`` was already replaced (accelerate
hooks) are never patched. A patched layer checks the rest on every call (cheaply) and defers to PEFT's own forward
while it does not hold: DoRA and other LoRA variants, several or no active adapters, ``lora_bias``, custom dropout or
adapter modules, hooks, weights that are not float Parameters (torchao), trainable base weights, a merged or
disabled adapter, ``adapter_names`` (mixed batches) or other extra arguments, and, under ``torch.compile``, a
scaling held as a 0-d tensor (PEFT's ``prepare_model_for_compiled_hotswap``: reading it as a float would break
the graph and recompile at each hot swap). So a layer whose active adapter is
unsupported when ``patch_peft`` runs takes the fused path once ``set_adapter`` picks a supported one. Both kinds
are named in one warning.

Numerics: identical to PEFT in fp32, and in fp16 outside autocast on the reference path (both compute the LoRA
term in fp32 there). With bf16 activations and fp32 adapters PEFT casts the input up and computes the LoRA term in
fp32, lora_fast keeps it in bf16, and the fused kernels read the activations' dtype with fp32 accumulation (see
``lora_fast.layer``); those agree with PEFT to the half-precision rounding. Dropout masks come from lora_fast's
generator, so in training mode with dropout the masks (not their distribution) differ from ``nn.Dropout``'s.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from lora_fast.functional import lora_linear, resolve_backend
from lora_fast.layer import (
    LORA_BASE_TYPES,
    bound_own_forward,
    calls_more_than_forward,
    forward_replaced,
    fusable_base,
)

_MARK = "_lora_fast_backend"  # present on patched layers: the backend their fast forward uses
_NO_MARK = object()  # a layer without _MARK (patch_peft restores that on an exception)


_CLASSES = None


def _lora_classes():
    """PEFT's (lora.Linear, LoraLayer, BaseTunerLayer), imported once."""
    global _CLASSES
    if _CLASSES is None:
        try:
            from peft.tuners.lora.layer import Linear, LoraLayer
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError as e:  # pragma: no cover - peft is installed with the test extras
            raise ImportError("patch_peft needs the `peft` package (pip install 'peft>=0.21')") from e
        _CLASSES = (Linear, LoraLayer, BaseTunerLayer)
    return _CLASSES


_FAST_CLASS = None


def _fast_class():
    """``FastLoraLinear``: PEFT's ``lora.Linear`` with lora_fast's forward (built once, on first use)."""
    global _FAST_CLASS
    if _FAST_CLASS is None:
        peft_linear, _, _ = _lora_classes()
        _FAST_CLASS = type("FastLoraLinear", (peft_linear,), {
            "forward": _fast_forward, "__module__": __name__, "__qualname__": "FastLoraLinear",
            "__doc__": "PEFT's lora.Linear computing its forward with lora_fast (see lora_fast.peft_compat).",
        })
    return _FAST_CLASS


def __getattr__(name: str):
    if name == "FastLoraLinear":  # pickle finds the class by name, also in a process that has not patched yet
        return _fast_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _structural_reason(module: nn.Module) -> str | None:
    """Why this PEFT layer can never take the fused path (its class, or its base's), or None. Checked once, by
    ``patch_peft``: what can change later (adapters, hooks, weights) is ``_state_reason``'s, checked per call."""
    peft_linear, _, base_tuner = _lora_classes()
    if type(module) not in (peft_linear, _fast_class()):
        kind = "embedding" if "Embedding" in type(module).__name__ else "not a plain lora.Linear (quantised, conv, ...)"
        return f"{type(module).__module__}.{type(module).__name__}: {kind}"
    if forward_replaced(module):
        return "forward already replaced (e.g. an accelerate hook)"
    base = module.base_layer
    if isinstance(base, base_tuner):
        return "nested adapter layers"
    if not isinstance(base, LORA_BASE_TYPES):
        return f"base layer is a {type(base).__name__}, not nn.Linear/Conv1D"
    return None


def _state_reason(module: nn.Module) -> str | None:
    """Why this (structurally supported) PEFT layer cannot take the fused path now — its base's hooks and weights,
    the active adapter's setting — or None when it can. Cheap: it runs on every call of a patched layer."""
    base = module.base_layer
    if not fusable_base(base):  # PEFT calls base_layer(x): what runs there must run
        return (f"base layer {type(base).__name__} runs more than nn.Linear/Conv1D's forward (an overriding "
                "subclass, hooks, offloaded weights)")
    w = base.weight
    if type(w).__name__ == "DTensor":
        return "sharded base weight (DTensor: FSDP2 fully_shard ran first; patch before sharding)"
    if type(w) not in (nn.Parameter, torch.Tensor) or not w.is_floating_point():
        return f"quantised base weight ({type(w).__name__}, {w.dtype})"
    if w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "trainable base weight or bias (PEFT's bias='all'/'lora_only', or an unfrozen base)"
    active = [a for a in module.active_adapters if a in module.lora_A]  # PEFT skips adapters a layer lacks
    if len(active) != 1:
        return f"{len(active)} active adapters {active}" if active else "no active adapter in this layer"
    a = active[0]
    if isinstance(module.scaling[a], torch.Tensor) and torch.compiler.is_compiling():
        # PEFT's prepare_model_for_compiled_hotswap: a 0-d tensor, swapped in place; reading it as a float would
        # break the graph (and bake one adapter's value into it)
        return "scaling held as a tensor (prepare_model_for_compiled_hotswap), under torch.compile"
    if module.use_dora.get(a, False):
        return "DoRA"
    if a in getattr(module, "lora_variant", {}):
        return f"LoRA variant {type(module.lora_variant[a]).__name__}"
    lora_A, lora_B, drop = module.lora_A[a], module.lora_B[a], module.lora_dropout[a]
    if getattr(module, "lora_bias", {}).get(a, False) or lora_B.bias is not None or lora_A.bias is not None:
        return "lora_bias"
    if type(drop).forward not in (nn.Dropout.forward, nn.Identity.forward):
        return f"custom dropout {type(drop).__name__}"
    if isinstance(drop, nn.Dropout) and drop.training and drop.p >= 1.0:
        return "dropout p = 1 (the LoRA term is zero in training)"
    if type(lora_A).forward is not nn.Linear.forward or type(lora_B).forward is not nn.Linear.forward:
        return "lora_A/lora_B with their own forward (a subclass of nn.Linear)"
    if (calls_more_than_forward(lora_A) or calls_more_than_forward(lora_B) or calls_more_than_forward(drop)
            or lora_A.weight.device.type == "meta" or lora_B.weight.device.type == "meta"):
        return "hooks or offloaded weights on the adapter's modules"
    return None


def _fused_now(module: nn.Module) -> bool:
    """Whether a patched layer's plain call (no extra arguments) takes the fused path now."""
    return not module.disable_adapters and not module.merged and _state_reason(module) is None


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The patched forward of a PEFT ``lora.Linear``: one ``lora_linear`` call on the layer's own tensors. A layer
    unpatched since (whose hook kept this bound method, say) runs PEFT's own forward."""
    if type(self) is not _fast_class() or args or kwargs or not _fused_now(self):
        return _lora_classes()[0].forward(self, x, *args, **kwargs)  # PEFT's own path
    a = next(a for a in self.active_adapters if a in self.lora_A)
    base, drop = self.base_layer, self.lora_dropout[a]
    return lora_linear(
        x, base.weight, base.bias, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a],  # (r,K) (N,r)
        dropout_p=drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0, training=drop.training,
        fan_in_fan_out=not isinstance(base, nn.Linear), backend=getattr(self, _MARK),
    )


def _peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a PeftModel (or an nn.Module with PEFT LoRA layers), got {type(model).__name__}")
    _, lora_layer, _ = _lora_classes()
    return {n: m for n, m in model.named_modules() if isinstance(m, lora_layer)}


def patch_peft(peft_model: nn.Module, backend: str | None = None) -> nn.Module:
    """Route the supported LoRA layers of a PEFT model through lora_fast's fused path, in place.

    Args:
        peft_model: a ``PeftModel`` (or any module holding PEFT LoRA layers, e.g. after transformers'
            ``add_adapter``).
        backend: lora_fast backend for the patched layers ("auto", "reference", "triton"; None reads
            ``LORA_FAST_BACKEND``).

    Returns:
        The same model. Patching twice is harmless; LoRA layers created later (``add_adapter`` with new target
        modules) stay PEFT's until ``patch_peft`` is called again. Layers left on PEFT's path are named, with the
        reason, in one ``UserWarning``.

    Raises:
        TypeError: not an nn.Module. ValueError: no PEFT LoRA layer in it.
    """
    layers = _peft_lora_layers(peft_model)
    if not layers:
        raise ValueError(f"patch_peft: {type(peft_model).__name__} has no PEFT LoRA layer")
    if backend is not None:
        resolve_backend(backend)  # an unknown name fails here, not at the first forward
    left: dict[str, list[str]] = {}  # never patched: the layer's class or base
    waiting: dict[str, list[str]] = {}  # patched, on PEFT's path until the active adapter's setting is supported
    before = []  # (layer, its class, its mark or _NO_MARK): an exception puts every layer back as it was
    try:
        for name, module in layers.items():
            if bound_own_forward(module, (type(module).forward, _fast_forward)):
                del module.__dict__["forward"]  # left by a removed hook: what the class (swapped) runs anyway
            # a patched layer (hooked since, say) is patched: patching again updates its backend
            reason = None if type(module) is _fast_class() else _structural_reason(module)
            if reason is not None:
                left.setdefault(reason, []).append(name)
                continue
            before.append((module, type(module), module.__dict__.get(_MARK, _NO_MARK)))
            setattr(module, _MARK, backend)  # patching twice only updates the backend
            module.__class__ = _fast_class()
            reason = _state_reason(module)
            if reason is not None:
                waiting.setdefault(reason, []).append(name)

        def listed(groups):
            return "; ".join(f"{reason}: {', '.join(names)}" for reason, names in groups.items())
        msgs = []
        if left:
            msgs.append(f"{sum(map(len, left.values()))} of {len(layers)} LoRA layer(s) stay on PEFT's own path — "
                        f"{listed(left)}")
        if waiting:
            msgs.append(f"{sum(map(len, waiting.values()))} of {len(layers)} LoRA layer(s) stay on PEFT's own path "
                        f"until their setting is supported (patched: they take lora_fast's path after a set_adapter "
                        f"to a supported adapter, hooks removed, ...) — {listed(waiting)}")
        if msgs:
            warnings.warn("patch_peft: " + ". ".join(msgs), stacklevel=2)
    except BaseException:
        for module, cls, mark in reversed(before):
            module.__class__ = cls
            if mark is _NO_MARK:
                module.__dict__.pop(_MARK, None)
            else:
                setattr(module, _MARK, mark)
        raise
    return peft_model


def unpatch_peft(peft_model: nn.Module) -> nn.Module:
    """Give every layer patched by ``patch_peft`` its PEFT class (and forward) back, in place; returns the model.

    Raises:
        TypeError: not an nn.Module. ValueError: no PEFT LoRA layer in it (as ``patch_peft``). A model none of
        whose layers is patched is returned unchanged, with a warning.
    """
    peft_linear = _lora_classes()[0]
    layers = _peft_lora_layers(peft_model)
    if not layers:
        raise ValueError(f"unpatch_peft: {type(peft_model).__name__} has no PEFT LoRA layer")
    patched = 0
    for module in layers.values():
        if type(module) is _fast_class():
            module.__class__ = peft_linear
            patched += 1
        if hasattr(module, _MARK):
            delattr(module, _MARK)
    if not patched:
        warnings.warn(f"unpatch_peft: none of the {len(layers)} LoRA layer(s) of {type(peft_model).__name__} was "
                      "patched: nothing done", stacklevel=2)
    return peft_model


def is_patched(module: nn.Module) -> bool:
    """Whether a PEFT LoRA layer currently runs through lora_fast: patched, and its next call (no extra
    arguments) takes the fused path — not while merged, disabled or in an unsupported setting."""
    return type(module) is _fast_class() and _fused_now(module)
