"""After training: ``merge_lora`` / ``unmerge_lora`` (ΔW folded into the base weights and back),
``merge_and_unload`` (plain modules with ΔW inside), ``unload`` (plain modules, adapters dropped) and the
``disable_adapter`` context (the base model's outputs with the adapters left in place) — PEFT's
``merge_adapter``/``unmerge_adapter``/``merge_and_unload``/``unload``/``disable_adapter``, as functions of the model.

Nothing to do is a warning (merging a merged model), no LoRA layer at all is an error: never a silent no-op.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings

import torch
import torch.nn as nn

from lora_fast.adapter_config import _names
from lora_fast.inject import (
    CLEARED_TIE,
    _forward_reads_tie_flag,
    _set_submodule,
    is_peft_layer,
    lora_layers,
    modules_saved_whole,
    parameter_names,
    tie_reading_classes,
    tied_names,
    ties_lost_with_flag,
    untie_embeddings_in_config,
    untied_embeddings,
    unwrap_model,
)
from lora_fast.layer import LinearWithLoRA
from lora_fast.module_names import COMPILE_SEGMENT

# PEFT's own method for each of these, named when they are called on a model holding PEFT's LoRA layers
_PEFT_METHOD = {"merge_lora": "merge_adapter()", "unmerge_lora": "unmerge_adapter()",
                "merge_and_unload": "merge_and_unload()", "unload": "unload()", "disable_adapter": "disable_adapter()"}


def _layers_or_raise(model: nn.Module, who: str) -> dict[str, LinearWithLoRA]:
    layers = lora_layers(model)
    if not layers:
        if any(is_peft_layer(m) for m in model.modules()):  # a PeftModel, patched by patch_peft or not
            raise ValueError(f"{who}: {type(model).__name__} holds PEFT's LoRA layers, not lora_fast's (patch_peft "
                             f"keeps them PEFT's); use PEFT's own model.{_PEFT_METHOD[who]}")
        raise ValueError(f"{who}: {type(model).__name__} has no lora_fast LoRA layer (apply_lora first)")
    return layers


def _check_not_compiled_alone(layers: dict[str, LinearWithLoRA], who: str) -> None:
    """A LoRA layer compiled on its own (``torch.compile(layer)`` in its parent's slot) cannot be taken out: the
    compiled forward is bound to it and would go on running the LoRA term."""
    alone = [n.removesuffix(f".{COMPILE_SEGMENT}") for n in layers if n.endswith(f".{COMPILE_SEGMENT}")]
    if alone:
        raise ValueError(f"{who}: {_names(alone)} compile the LoRA layer itself (torch.compile of that layer), and "
                         "the compiled code would keep running it; call it before compiling, or on the layer "
                         "(<module>._orig_mod), then put the result in the module's place")


def merge_lora(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Fold ΔW into every LoRA layer's base weight (forward becomes the base alone).

    ``safe_merge``: check every merged weight for inf/NaN before writing any (``LinearWithLoRA.merged_weight``);
    a failing layer raises ``ValueError`` naming it and the model is left as it was (PEFT checks layer by layer and
    leaves the layers before the failing one merged). A model whose layers are all merged already gets a warning
    (nothing to do), as PEFT warns; one without LoRA layers is an error.
    """
    layers = _layers_or_raise(model, "merge_lora")
    if all(m.merged for m in layers.values()):
        warnings.warn("merge_lora: every LoRA layer is already merged, nothing done", stacklevel=2)
    if safe_merge:
        _check_merges(layers, "merge_lora")
    untied = _untie_bases(model, layers)
    _merge_unmerged(layers)
    _warn_untied("merge_lora", untied, untie_embeddings_in_config(model) if untied else "")
    return model


def _untie_bases(model: nn.Module, layers: dict[str, LinearWithLoRA]) -> list[str]:
    """Give each unmerged layer whose base weight is tied to another parameter (GPT-2's ``lm_head`` and ``wte``) its
    own copy before merging: ΔW folded into a shared weight would change the input embeddings too, and the merged
    model would no longer compute what the adapter did. Where that breaks the word-embedding tie, the caller sets
    the model's ``tie_word_embeddings`` to False (``untie_embeddings_in_config``; ``_fold_decoder_scale``), so that
    ``save_pretrained``/``from_pretrained`` keep the two apart. Returns what was untied, for ``_warn_untied``."""
    names_of, untied = parameter_names(model), []
    for name, m in layers.items():
        w = m.linear.weight
        tied = tied_names(names_of, name, w)
        if tied and not m.merged:
            m.linear.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            untied.append(f"{name} (was tied to {', '.join(tied)})")
    return untied


def _warn_untied(who: str, untied: list[str], flag: str) -> None:
    """Say what was untied (memory: one more copy of that weight) and what became of the tie flag."""
    if untied:
        flag = f" ({flag})" if flag else ""
        warnings.warn(f"{who}: the base weight of {'; '.join(untied)} is now a copy of its own, so that merging ΔW "
                      f"into it leaves the weights it was tied to unchanged{flag}", stacklevel=3)
    elif flag:
        warnings.warn(f"{who}: {flag}", stacklevel=3)


def _check_merges(layers: dict[str, LinearWithLoRA], who: str) -> None:
    """``safe_merge``: compute each unmerged layer's W₀ + ΔW (one at a time: one weight of extra memory) and raise,
    naming the layer, at the first with inf/NaN — before anything is merged or untied."""
    for name, m in layers.items():
        if not m.merged:
            try:
                m.merged_weight(safe_merge=True)
            except ValueError as e:
                raise ValueError(f"{who}: {name}: {e}") from e


def _merge_unmerged(layers: dict[str, LinearWithLoRA]) -> None:
    """Merge every layer not merged yet."""
    for m in layers.values():
        if not m.merged:
            m.merge_weights()


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``. A model with no merged layer gets a warning (nothing to do); one without LoRA layers
    is an error."""
    layers = _layers_or_raise(model, "unmerge_lora")
    todo = [m for m in layers.values() if m.merged]
    if not todo:
        warnings.warn("unmerge_lora: no LoRA layer is merged, nothing done", stacklevel=2)
    for m in todo:
        m.unmerge_weights()
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every adapter and put the original module types back: a plain model, no lora_fast inside.

    Parameters of the restored bases keep ``requires_grad=False``; call ``requires_grad_()`` to train them. A
    ``LinearWithLoRA`` given itself returns its merged base (use the return value). ``safe_merge``: as in
    ``merge_lora``: every layer is checked before any is merged or replaced, so a failure leaves the model as it
    was.
    """
    if isinstance(model, LinearWithLoRA):
        if not model.merged:
            model.merge_weights(safe_merge=safe_merge)
        return model.merged_base()
    layers = _layers_or_raise(model, "merge_and_unload")
    _check_not_compiled_alone(layers, "merge_and_unload")
    if safe_merge:
        _check_merges(layers, "merge_and_unload")
    untied = _untie_bases(model, layers)
    _merge_unmerged(layers)
    for name, m in layers.items():
        _set_submodule(model, name, m.merged_base())
    if hasattr(model, "lora_fast_config"):
        del model.lora_fast_config
    folded = _fold_decoder_scale(model, "merge_and_unload")
    flag = folded or (untie_embeddings_in_config(model) if untied else "")
    copied = _copy_flag_ties(model)
    if copied:
        flag = (f"{flag}; " if flag else "") + (f"{', '.join(copied)} got a copy of the input embeddings of their own: "
                                               "the cleared flag no longer ties them, and save_pretrained writes a "
                                               "shared weight once (from_pretrained loaded them at random)")
    _warn_untied("merge_and_unload", untied, flag)
    return model


def _copy_flag_ties(model: nn.Module) -> list[str]:
    """After lora_fast cleared ``tie_word_embeddings`` (``untie_embeddings_in_config``, ``_fold_decoder_scale``):
    modules other than the input embeddings that still share their weight in memory, tied only because the flag
    said so (BART's encoder/decoder ``embed_tokens`` in transformers 4; transformers 5 keeps the flag there:
    ``ties_lost_with_flag``), each get a copy of their own, so that ``save_pretrained`` writes them and
    ``from_pretrained`` loads them (a shared weight is written once, and the cleared flag no longer ties it back).
    One module known under two names (T5's ``shared`` and ``encoder.embed_tokens``) stays one. Memory: one copy of
    the embeddings per such module. Returns their names."""
    found = untied_embeddings(model)
    if found is None:
        return []
    inner, inp, out = found
    if not inner.__dict__.get(CLEARED_TIE) or getattr(getattr(inner, "config", None), "tie_word_embeddings", True):
        return []
    w, copied = inp.weight, []
    for name, m in inner.named_modules():  # each module once, under its first name
        if m is not inp and m is not out and getattr(m, "weight", None) is w:
            m.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            copied.append(name)
    return copied


# T5-family forwards: ``if self.config.tie_word_embeddings: sequence_output = sequence_output * (self.model_dim**-0.5)``
_DECODER_SCALE = re.compile(r"\*\s*\(?\s*self\.(?:model_dim|config\.d_model)\s*\*\*\s*-\s*0?\.5\b")


def _fold_decoder_scale(model: nn.Module, who: str) -> str:
    """A merged model (``merge_and_unload``) whose output embeddings are no longer tied to the input embeddings,
    while ``tie_word_embeddings`` stays set because its forward reads the flag to scale the decoder output by
    d_model**-0.5 (SwitchTransformers, UDOP; UMT5 before transformers 5.24; T5 and LongT5 before 5;
    ``untie_embeddings_in_config``). Saved like that, transformers 4's ``from_pretrained`` tied the head back to
    the embeddings (logits 5 % and 33 % off in a tiny T5 and UMT5), and ``tie_weights()`` does so in any version.

    Here the scale goes into the head instead: lm_head.weight · d_model**-0.5, and the flag is cleared, so the
    forward no longer scales: logits = (s·W)h = W(s·h), the same up to one rounding of the weight. Only where the
    config keeps a cleared flag when loaded (not transformers 5's T5 family: ``_cleared_flag_survives``), and where
    the forward's scale is that expression; another reader is left as it is, with a warning. A merged model of
    this kind saved with one major version of transformers does not load right in the other.

    Not in ``unload`` or ``merge_lora``: their model takes adapters again, and an adapter's trained head (PEFT's
    numbers) expects the scale in the forward. Returns what was done ("" when nothing), for the caller's
    warning."""
    found = untied_embeddings(model)
    if found is None:
        return ""
    inner, _inp, out = found
    config = getattr(inner, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return ""
    readers = {type(m) for m in inner.modules() if _forward_reads_tie_flag(type(m))}
    if not readers or not _cleared_flag_survives(config):
        return ""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in inner.modules())
               if getattr(c, "tie_word_embeddings", False)}
    if ties_lost_with_flag(inner, list(configs.values()), out):  # 5.0 UMT5: the flag ties embed_tokens too
        return ""
    d_model = getattr(config, "d_model", None)
    unknown = sorted(c.__name__ for c in readers if not isinstance(d_model, int)
                     or not _DECODER_SCALE.search(inspect.getsource(c.forward)))
    if unknown:
        warnings.warn(f"{who}: {', '.join(unknown)}.forward reads tie_word_embeddings in a way lora_fast does not "
                      "know, so the flag stays set with the output embeddings untied: tie_weights() (and "
                      "from_pretrained in transformers 4) would tie them again", stacklevel=3)
        return ""
    with torch.no_grad():
        out.weight.mul_(d_model ** -0.5)
    inner.__dict__[CLEARED_TIE] = True
    for m in inner.modules():  # every config object a reader may consult (the model's and its stacks')
        c = getattr(m, "config", None)
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    return (f"the untied output embeddings of {type(inner).__name__} now hold the decoder's d_model**-0.5 scale and "
            "tie_word_embeddings is False, so that the saved model loads with its own head and the same logits")


def _cleared_flag_survives(config) -> bool:
    """Whether ``config`` saved with ``tie_word_embeddings`` False loads with it False. transformers 5's T5-family
    configs force it True; there the flag stays, and transformers 5's ``from_pretrained`` keeps an untied head
    whose saved weights differ from the embeddings'."""
    try:
        return type(config).from_dict({**config.to_dict(), "tie_word_embeddings": False}).tie_word_embeddings is False
    except Exception:  # noqa: BLE001  (a config that does not round-trip: leave the model as it is)
        return False


def unload(model: nn.Module) -> nn.Module:
    """Take every LoRA layer out *without* merging: the original modules back, the adapters dropped (PEFT's
    ``unload()``): how to go back to the base model, e.g. to load an adapter of another rank or other targets.
    Merged layers are unmerged first (the base weight comes back up to one rounding away, in any dtype, as in PEFT).
    ``modules_to_save`` were trained in place and stay as trained (PEFT's ``unload`` also keeps the trained copy).
    A ``LinearWithLoRA`` given itself returns its base."""
    if isinstance(model, LinearWithLoRA):
        if model.merged:
            model.unmerge_weights()
        return model.linear
    layers = _layers_or_raise(model, "unload")
    _check_not_compiled_alone(layers, "unload")
    for name, m in layers.items():
        if m.merged:
            m.unmerge_weights()
        _set_submodule(model, name, m.linear)
    trained = modules_saved_whole(model)
    if hasattr(model, "lora_fast_config"):
        del model.lora_fast_config
    if trained:
        warnings.warn(f"unload: {', '.join(trained)} (modules_to_save) keep their trained weights, as PEFT's unload "
                      "keeps its trained copy: the model is not the base model again; load another adapter into a "
                      "freshly loaded base", stacklevel=2)
    copied = _copy_flag_ties(model)
    if copied:
        warnings.warn(f"unload: {', '.join(copied)} got a copy of the input embeddings of their own: the cleared "
                      "tie_word_embeddings no longer ties them, and save_pretrained writes a shared weight once",
                      stacklevel=2)
    _warn_head_tied_back(model)
    return model


def _warn_head_tied_back(model: nn.Module) -> None:
    """``unload`` keeps a head trained whole (``modules_to_save``), untied from the input embeddings; where the
    model's forward reads ``tie_word_embeddings`` (T5 family) the flag stays set, and transformers 4's
    ``from_pretrained`` of the saved model ties the head back to the embeddings (the trained head is lost). Said,
    not changed: the unloaded model takes adapters again, whose heads expect the flag's scale."""
    import transformers

    found = untied_embeddings(model)
    if found is None or int(transformers.__version__.split(".")[0]) >= 5:
        return
    inner = found[0]
    if getattr(getattr(inner, "config", None), "tie_word_embeddings", False) and tie_reading_classes(inner):
        warnings.warn(f"unload: {type(inner).__name__}'s head is untied from its input embeddings (trained whole), "
                      "but tie_word_embeddings stays set (its forward scales by it): save_pretrained then "
                      "from_pretrained with transformers 4 would tie the head back to the embeddings; export with "
                      "merge_and_unload, which moves the scale into the head", stacklevel=3)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """``with disable_adapter(model): ...`` runs the model without its LoRA terms (PEFT's ``with
    model.disable_adapter():``): base-model outputs — a DPO reference model, a before/after comparison — without
    merging, unloading or copying. The adapters stay in place, untouched, and are back on exit (also after an
    exception); contexts nest. Merged layers are refused (their ΔW is inside W₀: ``unmerge_lora`` first), and
    merging inside the context makes their forward raise rather than silently include ΔW. A model with
    ``modules_to_save`` is refused: they are trained in place, their original weights are gone (PEFT keeps a copy
    and switches back to it).
    """
    inner = unwrap_model(model)
    layers = _layers_or_raise(inner, "disable_adapter")
    whole = modules_saved_whole(inner)
    if whole:  # PEFT switches back to the original module it keeps beside the trained copy; lora_fast keeps none
        raise ValueError(f"disable_adapter: {_names(whole)} {'is' if len(whole) == 1 else 'are'} trained whole "
                         "(modules_to_save) in place, and lora_fast keeps no copy of the original weights (PEFT does), "
                         "so the base model's outputs cannot be computed here; keep a frozen copy of the base model "
                         "for them (e.g. as the DPO reference model)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"disable_adapter: LoRA layers are merged ({', '.join(merged[:3])}"
                         f"{', ...' if len(merged) > 3 else ''}): their ΔW is inside the base weight; call "
                         "unmerge_lora(model) first")
    before = {n: m.disabled for n, m in layers.items()}
    for m in layers.values():
        m.disabled = True
    try:
        yield model
    finally:
        for n, m in layers.items():
            m.disabled = before[n]
