"""Adapters of models with wrappers inside (``lora_fast.module_names``): torch's activation-checkpoint wrapper and
``torch.compile`` of submodules add a segment to module names; adapter files must hold the plain names PEFT uses,
load back into wrapped or plain models, and leave the wrappers in place. FSDP1 and partitioned (ZeRO-3-style)
parameters are refused instead of written wrong."""

# ruff: noqa: I001  (tests.triton_interpret is imported first, see test_adapter.py)
from __future__ import annotations

try:
    import tests.triton_interpret  # noqa: F401
except ImportError:  # triton missing
    pass

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_fast import LinearWithLoRA, apply_lora, load_adapter, lora_layers, save_adapter, unwrap_model
from lora_fast.adapter import AdapterLoadResult
from tests.test_adapter import TOL, _gpt2, _ids, _logits, _randomise_lora
from tests.utils import MISSING, assert_rel_close

peft = pytest.importorskip("peft", reason=MISSING["peft"])
ckpt = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
                           reason="torch built without torch.distributed: no activation-checkpoint wrapper")
from transformers.models.gpt2.modeling_gpt2 import GPT2Block  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

TARGETS = ["c_attn", "c_fc"]


def _adapted():
    """(plain base, LoRA model with random B) — the same weights as the plain base outside the adapter."""
    torch.manual_seed(0)
    base = _gpt2()
    model = apply_lora(copy.deepcopy(base), TARGETS, rank=4, alpha=8)
    _randomise_lora(model)
    return base, model.eval()


def _wrap_blocks(model):
    ckpt.apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, GPT2Block))
    assert all(isinstance(b, ckpt.CheckpointWrapper) for b in model.transformer.h)
    return model


def _saved(model, directory):
    save_adapter(model, directory)
    return load_file(directory / "adapter_model.safetensors"), json.loads((directory / "adapter_config.json")
                                                                          .read_text())


def _peft_logits(base, directory, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    return _logits(pm, ids)


def test_checkpoint_wrapped_blocks_save_plain_keys_and_load_back(tmp_path):
    base, model = _adapted()
    plain_sd, plain_cfg = _saved(model, tmp_path / "plain")
    _wrap_blocks(model)
    assert any("_checkpoint_wrapped_module" in n for n in lora_layers(model))  # the names really changed
    sd, cfg = _saved(model, tmp_path / "wrapped")
    assert sd.keys() == plain_sd.keys() and all(torch.equal(sd[k], plain_sd[k]) for k in sd)
    assert cfg == plain_cfg
    ids = _ids()
    want = _logits(model, ids)
    # Before: PEFT found none of the keys, warned, and ran the base model. Now it loads the adapter.
    assert_rel_close(_peft_logits(base, tmp_path / "wrapped", ids), want, TOL, "PEFT, adapter of wrapped model")
    assert all(isinstance(b, ckpt.CheckpointWrapper) for b in model.transformer.h)  # save put the wrappers back

    for_inference = _wrap_blocks(copy.deepcopy(base).train())  # is_trainable=False: eval mode, wrappers included
    load_adapter(for_inference, tmp_path / "wrapped", is_trainable=False)
    assert not any(m.training for m in for_inference.modules())

    wrapped_base = _wrap_blocks(copy.deepcopy(base))  # wrapped first, then the adapter loaded into it
    assert load_adapter(wrapped_base, tmp_path / "wrapped", is_trainable=True) == AdapterLoadResult([], [])
    assert all(isinstance(b, ckpt.CheckpointWrapper) for b in wrapped_base.transformer.h)
    assert len(lora_layers(wrapped_base)) == 4
    assert_rel_close(_logits(wrapped_base.eval(), ids), want, TOL, "adapter loaded into a wrapped model")
    # Training through the wrappers still works and gives the plain model's gradients (no dropout here).
    plain = copy.deepcopy(base)
    load_adapter(plain, tmp_path / "plain")
    grads = []
    for m in (wrapped_base, plain):
        m.train()
        torch.manual_seed(1)  # the same dropout masks in GPT-2's own dropouts (the wrapper replays them)
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # 4.x: the replay appended to the cache
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in m.named_parameters()
                      if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for n in grads[1]:
        assert_rel_close(grads[0][n], grads[1][n], TOL, f"grad {n}")


def test_wrapper_directly_around_each_target(tmp_path):
    """The checkpoint wrapper around each Conv1D itself: the LoRA layer load_adapter builds goes inside it."""
    base, model = _adapted()
    save_adapter(model, tmp_path)
    wrapped = copy.deepcopy(base)
    ckpt.apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, Conv1D))
    assert load_adapter(wrapped, tmp_path) == AdapterLoadResult([], [])
    c_attn = wrapped.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, ckpt.CheckpointWrapper)
    assert isinstance(c_attn._checkpoint_wrapped_module, LinearWithLoRA)
    ids = _ids()
    assert_rel_close(_logits(wrapped.eval(), ids), _logits(model, ids), TOL, "LoRA layers inside the wrappers")
    sd, _ = _saved(wrapped, tmp_path / "again")  # and saved again under the plain names
    assert sd.keys() == load_file(tmp_path / "adapter_model.safetensors").keys()
    # A whole model wrapped at the top is unwrapped too.
    assert unwrap_model(ckpt.checkpoint_wrapper(model)) is model


def test_compiled_blocks_and_a_compiled_target(tmp_path):
    base, model = _adapted()
    save_adapter(model, tmp_path / "plain")
    for i, block in enumerate(model.transformer.h):  # per-block compile, as for regional compilation
        model.transformer.h[i] = torch.compile(block, backend="eager")
    assert any("_orig_mod" in n for n in lora_layers(model))
    sd, _ = _saved(model, tmp_path / "compiled")
    assert sd.keys() == load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()

    fresh = copy.deepcopy(base)
    for i, block in enumerate(fresh.transformer.h):
        fresh.transformer.h[i] = torch.compile(block, backend="eager")
    assert load_adapter(fresh, tmp_path / "compiled") == AdapterLoadResult([], [])
    assert all(type(b).__name__ == "OptimizedModule" for b in fresh.transformer.h)
    ids = _ids()
    assert_rel_close(_logits(fresh.eval(), ids), _logits(model, ids), TOL, "adapter in compiled blocks")

    # fully_shard (FSDP2) swaps a compiled block's class for a subclass (FSDPOptimizedModule): still seen through.
    for block in model.transformer.h:
        block.__class__ = type("FSDPOptimizedModule", (type(block),), {})
    sd, _ = _saved(model, tmp_path / "sharded-compiled")
    assert sd.keys() == load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()

    # A target compiled on its own: its compiled code is bound to the plain projection, so loading is refused
    # before anything changes (the wrapper stays, no LoRA layer appears).
    alone = copy.deepcopy(base)
    alone.transformer.h[0].attn.c_attn = torch.compile(alone.transformer.h[0].attn.c_attn, backend="eager")
    with pytest.raises(ValueError, match=r"target 'transformer.h.0.attn.c_attn' is compiled on its own"):
        load_adapter(alone, tmp_path / "plain")
    assert type(alone.transformer.h[0].attn.c_attn).__name__ == "OptimizedModule" and not lora_layers(alone)


class _FakeFSDP1(nn.Module):
    """The attribute FSDP1 keeps its module under (FSDP1 itself needs a GPU to construct)."""

    def __init__(self, module):
        super().__init__()
        self._fsdp_wrapped_module = module


def test_fsdp1_and_partitioned_parameters_are_refused(tmp_path):
    base, model = _adapted()
    save_adapter(model, tmp_path / "src")
    model.transformer.h[0] = _FakeFSDP1(model.transformer.h[0])
    fresh = copy.deepcopy(base)
    fresh.transformer.h[0] = _FakeFSDP1(fresh.transformer.h[0])
    for fn in (lambda: save_adapter(model, tmp_path / "a"), lambda: load_adapter(fresh, tmp_path / "src")):
        with pytest.raises(ValueError, match=r"FSDP1 \(FullyShardedDataParallel\).*fully_shard"):
            fn()
    assert not (tmp_path / "a").exists() and not lora_layers(fresh)

    _, model = _adapted()  # DeepSpeed ZeRO-3 leaves a 0-element placeholder in each partitioned parameter
    layer = lora_layers(model)["transformer.h.1.mlp.c_fc"]
    layer.lora.lora_A.data = torch.empty(0)
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.c_fc.lora_A.weight \(0,\) \(expected \(4, 32\)\)"
                                         r".*GatheredParameters"):
        save_adapter(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_modules_to_save_survive_a_later_apply_lora_on_a_wrapped_model(tmp_path):
    """load_adapter records modules_to_save by their plain names; a later apply_lora (more targets) on the wrapped
    (checkpointed or compiled blocks) model keeps them trainable and saved, as on a plain model."""
    base = _gpt2()
    model = apply_lora(copy.deepcopy(base), ["c_attn"], rank=4, alpha=8, modules_to_save=["ln_1"])
    save_adapter(model, tmp_path / "a")
    for wrap in (None, "checkpoint", "compile"):
        m = copy.deepcopy(base)
        if wrap == "checkpoint":
            _wrap_blocks(m)
        elif wrap == "compile":
            for i, block in enumerate(m.transformer.h):
                m.transformer.h[i] = torch.compile(block, backend="eager")
        load_adapter(m, tmp_path / "a")
        apply_lora(m, ["c_fc"], rank=4, alpha=8)
        assert m.lora_fast_config["modules_to_save"] == ["transformer.h.0.ln_1", "transformer.h.1.ln_1"], wrap
        assert all(p.requires_grad for n, p in m.named_parameters() if ".ln_1." in n), wrap
        sd, _ = _saved(m, tmp_path / f"b{wrap}")
        assert {k for k in sd if ".ln_1." in k} == {f"base_model.model.transformer.h.{i}.ln_1.{w}" for i in (0, 1)
                                                   for w in ("weight", "bias")}, wrap


@pytest.mark.parametrize("inner", ["compile", "checkpoint"])
def test_nested_wrappers_are_all_seen_through_and_put_back(tmp_path, inner):
    """A checkpoint wrapper around a compiled block (or around another checkpoint wrapper): every wrapper segment
    leaves the saved names (the keys equal the plain model's, so PEFT loads them), the adapter loads into the same
    nesting, and each wrapper is back in its place, in its order, afterwards."""
    base, model = _adapted()
    plain_sd, _ = _saved(model, tmp_path / "plain")

    def nest(m):
        for i, block in enumerate(m.transformer.h):
            m.transformer.h[i] = ckpt.checkpoint_wrapper(
                torch.compile(block, backend="eager") if inner == "compile" else ckpt.checkpoint_wrapper(block))
        return [(w, w._checkpoint_wrapped_module, next(iter(w._checkpoint_wrapped_module.children())))
                for w in m.transformer.h]  # (outer, inner, block) per block

    def intact(m, chain):
        return all(m.transformer.h[i] is outer and outer._checkpoint_wrapped_module is mid
                   and next(iter(mid.children())) is block for i, (outer, mid, block) in enumerate(chain))

    chain = nest(model)
    sd, _ = _saved(model, tmp_path / "nested")
    assert sd.keys() == plain_sd.keys() and intact(model, chain)
    fresh = copy.deepcopy(base)
    fresh_chain = nest(fresh)
    assert load_adapter(fresh, tmp_path / "nested") == AdapterLoadResult([], [])
    assert intact(fresh, fresh_chain) and len(lora_layers(fresh)) == 4
    ids = _ids()
    assert_rel_close(_logits(fresh.eval(), ids), _logits(model, ids), TOL, f"adapter in {inner} inside checkpoint")


class _OrigModHolder(nn.Module):
    """Not torch.compile's wrapper, though its child has the attribute name compile uses."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def test_only_real_wrappers_are_seen_through_and_none_children_are_fine(tmp_path):
    """A module that merely holds a child named ``_orig_mod`` keeps that segment in the saved names (as
    ``state_dict()`` and PEFT name it: PEFT loads the adapter into the same model); a None child (a submodule set
    to None) is skipped, not walked into."""
    base, model = _adapted()
    base.transformer.h[0] = _OrigModHolder(base.transformer.h[0])
    model.transformer.h[0] = _OrigModHolder(model.transformer.h[0])
    for m in (base, model):
        m.transformer.h[1].register_module("removed", None)
    sd, _ = _saved(model, tmp_path)
    assert any(".h.0._orig_mod.attn.c_attn." in k for k in sd)
    ids = _ids()
    assert_rel_close(_peft_logits(base, tmp_path, ids), _logits(model, ids), TOL, "PEFT, _orig_mod kept")
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    assert_rel_close(_logits(fresh.eval(), ids), _logits(model, ids), TOL, "lora_fast reloading it")


def test_fsdp1_around_the_whole_model_is_refused(tmp_path):
    """FSDP1 wrapping the root (its usual use): the model's own names then start with its segment."""
    _, model = _adapted()
    with pytest.raises(ValueError, match=r"FSDP1 \(FullyShardedDataParallel\)"):
        save_adapter(_FakeFSDP1(model), tmp_path / "a")
    assert not (tmp_path / "a").exists()
