"""Tests written against mutants that survived the rest of the suite (round 6 of mutation testing: model injection
and adapter files — ``inject.py``, ``adapter.py``, ``adapter_config.py``, ``adapter_files.py`` and
``module_names.py``). Each pins a documented property, against PEFT itself where there is one (``get_peft_model``,
``PeftModel.from_pretrained``, the files PEFT writes), and names the mutation it kills. Tiny models only, built from
configs; nothing is downloaded."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from lora_fast import apply_lora, load_adapter, lora_layers, merge_lora, save_adapter
from tests.utils import MISSING

peft = pytest.importorskip("peft", reason=MISSING["peft"])


class _Box(nn.Module):
    """A plain container (PEFT refuses a ModuleDict in modules_to_save)."""


class _Net(nn.Module):
    """Linear layers under the given names (dots make nested ``_Box`` containers), run one after another."""

    def __init__(self, *names, width=8):
        super().__init__()
        self.names = names
        for name in names:
            parent = self
            *path, leaf = name.split(".")
            for seg in path:
                if seg not in parent._modules:
                    parent.add_module(seg, _Box())
                parent = parent._modules[seg]
            parent.add_module(leaf, nn.Linear(width, width))

    def forward(self, x):
        for name in self.names:
            x = self.get_submodule(name)(x)
        return x


def _peft_model(model, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**cfg))


def _peft_targets(model, **cfg) -> list[str]:
    """The modules PEFT's get_peft_model gives a LoRA layer, named as in the base model."""
    wrapped = _peft_model(copy.deepcopy(model), **cfg)
    return [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)]


def _ours(model, *args, **kw) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(lora_layers(apply_lora(copy.deepcopy(model), *args, **kw)))


# ------------------------------------------------------------------------------------------------- target matching
def test_a_regex_target_must_match_the_whole_name_as_peft():
    """Module doc: a ``target_modules`` string is "a regular expression matched (``re.fullmatch``) against the full
    module name", PEFT's rule: ``"lin"`` selects ``lin``, not ``lin2``, whose name merely starts with it.
    Kills ``module_matches``: ``re.fullmatch`` replaced by ``re.match`` (a prefix match)."""
    model = _Net("lin", "lin2", "blocks.0.lin")
    want = _peft_targets(model, target_modules="lin", r=2)
    assert want == ["lin"]
    assert _ours(model, "lin", rank=2) == want


def test_modules_to_save_excludes_only_whole_segments_as_peft():
    """``_inside_saved``: a target is left out when it is, or lies inside, a ``modules_to_save`` module named by
    whole '.'-separated segments (PEFT's ``check_target_module_exists``): ``blk.head_proj`` is not inside ``head``.
    Kills ``_inside_saved``: the ``($|\\..*)`` right boundary dropped (``head_proj`` left out as "inside" head)."""
    model = _Net("body", "blk.head_proj", "head")
    want = _peft_targets(model, target_modules=["body", "head_proj"], modules_to_save=["head"], r=2)
    assert sorted(want) == ["blk.head_proj", "body"]
    assert sorted(_ours(model, ["body", "head_proj"], rank=2, modules_to_save=["head"])) == sorted(want)


def _peft_saved(model, tmp_path, seed=0, **cfg):
    """A PEFT adapter of ``model`` with non-zero B (trained-looking), saved by PEFT's own save_pretrained."""
    torch.manual_seed(seed)
    wrapped = _peft_model(copy.deepcopy(model), **cfg)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_()
    wrapped.save_pretrained(tmp_path)
    return wrapped


def test_a_peft_adapter_with_a_lookalike_of_modules_to_save_loads_as_peft(tmp_path):
    """``load_adapter`` finds the modules PEFT wraps (``_peft_targets``: PEFT's ``check_target_module_exists``):
    ``head_proj`` is a LoRA target beside ``modules_to_save=["head"]``, so PEFT's file holds its A and B, and a
    strict load takes them, giving PEFT's outputs.
    Kills ``_peft_targets``: the modules_to_save regex without its ``($|\\..*)`` right boundary."""
    base = _Net("body", "head_proj", "head")
    theirs = _peft_saved(base, tmp_path, target_modules=["body", "head_proj"], modules_to_save=["head"], r=2)
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(ours, tmp_path)
    assert sorted(lora_layers(ours)) == ["body", "head_proj"]
    x = torch.randn(3, 8)
    theirs.eval()
    torch.testing.assert_close(ours.eval()(x), theirs(x))


def test_layers_pattern_names_a_whole_segment_as_peft():
    """``layers_pattern`` names the segment before the layer index whole (PEFT: ``(?:^|.*?\\.){pattern}\\.(\\d+)\\.``):
    with ``layers_pattern="layers"``, ``sublayers.0.lin`` is in no layer, so only ``layers.0.lin`` is adapted, by
    ``apply_lora(config=...)`` as by ``get_peft_model``.
    Kills ``_peft_targets``: the '.' before the pattern dropped (``sublayers`` taken for ``layers``)."""
    base = _Net("layers.0.lin", "sublayers.0.lin", "layers.1.lin")
    cfg = dict(target_modules=["lin"], layers_to_transform=[0], layers_pattern="layers", r=2)
    want = _peft_targets(base, **cfg)
    assert want == ["layers.0.lin"]
    assert _ours(base, config=peft.LoraConfig(**cfg)) == want


# ------------------------------------------------------------------------------------------------ adapter files
def test_save_refuses_a_trainable_base_weight_inside_a_lora_layer(tmp_path):
    """``save_adapter`` docstring: state PEFT's format cannot express — "trainable base weights" — is a ValueError,
    not an adapter file silently without them (PEFT's LoRA layers hold no trained base weight).
    Kills ``_trainable_extras``: the raise for a trainable base parameter of a LoRA layer replaced by ``continue``."""
    model = apply_lora(_Net("body", "head"), ["body"], rank=2)
    model.body.linear.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"base parameter 'body\.linear\.weight' of LoRA layer 'body' is trainable"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


class _WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.norm(self.body(x))


def test_modules_to_save_travel_with_their_buffers_as_peft_saves_them(tmp_path):
    """A ``modules_to_save`` module is saved whole — its ``state_dict()``, buffers included, as PEFT saves it (a
    BatchNorm's running statistics): PEFT's file and ours hold the same keys, and ours, loaded by
    ``PeftModel.from_pretrained``, computes what our model does in eval mode.
    Kills ``_save_adapter``: a saved module's ``named_parameters()`` written in place of its ``state_dict()``."""
    base = _WithNorm()
    theirs = _peft_model(copy.deepcopy(base), target_modules=["body"], modules_to_save=["norm"], r=2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = apply_lora(copy.deepcopy(base), ["body"], rank=2, modules_to_save=["norm"])
    with torch.no_grad():
        ours.body.lora.lora_B.normal_()
        ours.train()(torch.randn(16, 8) * 3 + 1)  # moves the running statistics
    save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded(x), ours.eval()(x))


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_full_weights_of_a_lora_targeted_lm_head_load_into_existing_lora_layers(tmp_path):
    """Module doc: full base weights PEFT saves beside the adapter — "a LoRA-targeted embedding or lm_head
    (``lm_head.base_layer.weight``)" — are loaded into the base model, also when the model already has its LoRA
    layers (``apply_lora`` first: lora_fast names that weight ``lm_head.linear.weight``). PEFT's file, saved with
    ``save_embedding_layers=True`` after the head's weight changed, then gives PEFT's logits.
    Kills ``_peft_param_name``: only ``X.<leaf>`` mapped to ``X.base_layer.<leaf>``, not ``X.linear.<leaf>``."""
    base = _tiny_llama()
    theirs = _peft_model(copy.deepcopy(base), target_modules=["q_proj", "lm_head"], r=2)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "lm_head.base_layer" in n:  # a trained head's weight, saved in full
                p.add_(torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    ours = apply_lora(copy.deepcopy(base), ["q_proj", "lm_head"], rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(ours, tmp_path)
    ids = torch.tensor([[1, 5, 7, 30]])
    torch.testing.assert_close(ours.eval()(ids).logits, theirs.eval()(ids).logits)


class _Aliased(nn.Module):
    """One Linear under two names (as T5's ``shared`` is ``encoder.embed_tokens`` on transformers 4)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.shared = nn.Linear(8, 8)
        self.other = self.shared

    def forward(self, x):
        return self.shared(x) + self.other(self.body(x))


def test_a_module_saved_whole_under_two_names_gets_its_own_copy_as_peft(tmp_path):
    """``_untie_extras``: a ``modules_to_save`` module that is also reachable under another name gets a copy of its
    own, "as PEFT's wrapper holds one, and the other names keep the original module": loading PEFT's adapter
    (trained ``shared``) leaves ``other`` at the base weights, so the outputs are PEFT's.
    Kills ``_untie_extras``: the ``_module_aliases`` loop skipped (the trained weights reach ``other`` too)."""
    base = _Aliased()
    theirs = _peft_model(copy.deepcopy(base), target_modules=["body"], modules_to_save=["shared"], r=2)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(ours, tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    assert torch.equal(ours.other.weight, base.other.weight)


def test_loading_keeps_the_model_s_dtype_as_peft(tmp_path):
    """Loading copies the file's tensors into the model's parameters, which keep their dtype (PEFT's
    ``set_peft_model_state_dict`` does the same): a float32 adapter file loaded into a float64 model gives float64
    LoRA weights and ``modules_to_save`` weights, and PEFT's float64 outputs.
    Kills ``_load_adapter``: ``params[k].data = v`` in place of ``params[k].copy_(v)`` (the file's dtype taken)."""
    base = _Net("body", "head")
    _peft_saved(base, tmp_path, target_modules=["body"], modules_to_save=["head"], r=2)
    ours = copy.deepcopy(base).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(ours, tmp_path)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


class _Scaled(nn.Module):
    """A root-level parameter beside a Linear (PEFT's modules_to_save names submodules only)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.body(x) * self.scale


def test_save_refuses_a_trainable_parameter_of_the_root_module(tmp_path):
    """``save_adapter``: a trainable parameter that belongs to the root module cannot be expressed in PEFT's format
    ("modules_to_save needs a named submodule"): a ValueError naming it, nothing written — not the whole model
    saved as a module with the empty name.
    Kills ``_trainable_extras``: the ``if not owner: raise`` check dropped."""
    model = apply_lora(_Scaled(), ["body"], rank=2)
    model.scale.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trainable parameter 'scale' belongs to the root module"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_loading_into_merged_layers_is_refused_and_changes_nothing(tmp_path):
    """``load_adapter`` docstring: merged LoRA layers are a ValueError ("unmerge first"), the model unchanged: the
    merged layer runs W₀ + ΔW of the adapter it merged, so new A and B copied in would silently not be used.
    Kills ``_load_adapter``: the merged-layers check dropped."""
    base = _Net("body", "head")
    _peft_saved(base, tmp_path, target_modules=["body"], r=2)
    model = apply_lora(copy.deepcopy(base), ["body"], rank=2)
    with torch.no_grad():
        model.body.lora.lora_B.normal_()
    merge_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="merged"):
        load_adapter(model, tmp_path)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_adapter_loaded_for_training_trains_under_checkpointing_switched_on_later(tmp_path):
    """``load_adapter(is_trainable=True)`` is a load "to go on training": like ``apply_lora`` it watches the model, so
    reentrant activation checkpointing switched on afterwards (the Trainer's ``gradient_checkpointing=True``) still
    gives every LoRA weight its gradient (``lora_fast.checkpointing``) — on a ViT, for which transformers adds no
    input-grads hook of its own. The gradients equal those of the same model without checkpointing.
    Kills ``_load_adapter``: the closing ``prepare_for_checkpointing(model)`` dropped."""
    from lora_fast.checkpointing import enable_checkpointing
    from tests.test_mutants_r2 import LABELS, PIXELS, _assert_same_grads, _qv, _randomise_b, _tiny_vit, _vit_lora_grads

    src = _tiny_vit()
    save_adapter(_randomise_b(apply_lora(src, _qv(src), rank=4, alpha=8.0)), tmp_path)
    model = _tiny_vit()
    load_adapter(model, tmp_path)
    def loss(m):
        return lambda pixels, labels: m(pixel_values=pixels, labels=labels).loss

    plain = copy.deepcopy(model)
    want = _vit_lora_grads(plain, PIXELS, LABELS, loss(plain))
    enable_checkpointing(model, use_reentrant=True)
    _assert_same_grads(_vit_lora_grads(model, PIXELS, LABELS, loss(model)), want)
