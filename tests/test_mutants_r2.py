"""Tests written against mutants that survived the rest of the suite (round 2 of mutation testing: ``merge``,
``peft_compat``, ``checkpointing``, ``adapter_files``). Each pins a property against a reference (the base model,
the adapter's own logits, PEFT) and names the mutation it kills."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from lora_fast import LinearWithLoRA, apply_lora, lora_layers, merge_and_unload, merge_lora, unload, unmerge_lora
from lora_fast.checkpointing import enable_checkpointing
from tests.test_inject import tiny_gpt2
from tests.test_merge import _t5_logits, _tiny_bart
from tests.utils import assert_rel_close


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _randomise_b(model):
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.lora_B.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------------------------------------------------- merge
def test_merge_lora_leaves_a_layer_merged_on_its_own_tied_so_unmerge_restores_the_embeddings():
    """A tied lm_head merged by its own ``merge_weights()`` already put ΔW into the weight it shares with wte;
    ``merge_lora`` then merges the rest and must not untie that layer (its copy would take ΔW away with it), so
    ``unmerge_lora`` takes ΔW out of the shared weight again and the input embeddings are the base's.
    Kills ``_untie_bases``: ``if tied and not m.merged`` -> ``if tied``."""
    base = tiny_gpt2()
    with pytest.warns(UserWarning, match="tied"):
        model = _randomise_b(apply_lora(copy.deepcopy(base), ["c_attn", "lm_head"], rank=4, alpha=8.0))
    ids = torch.randint(0, 100, (2, 7))
    model.lm_head.merge_weights()
    merge_lora(model)
    unmerge_lora(model)
    assert model.lm_head.linear.weight is model.transformer.wte.weight  # still one weight, as before the merges
    assert_rel_close(model.transformer.wte.weight, base.transformer.wte.weight, 1e-6, "wte after unmerge")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.lora_B.zero_()
    assert_rel_close(_logits(model, ids), _logits(base, ids), 1e-5, "base logits after unmerge")


def test_merging_a_tied_head_keeps_the_frozen_base_frozen():
    """The copy a tied lm_head gets before ΔW is folded in is a base weight: frozen as the weight it copies (an
    optimizer built from ``requires_grad`` parameters after a merge must not start training it), for ``merge_lora``
    and ``merge_and_unload`` ("restored bases keep requires_grad=False").
    Kills ``_untie_bases``: the copy made with ``requires_grad=True``."""
    for fn in (merge_lora, merge_and_unload):
        with pytest.warns(UserWarning, match="tied"):
            model = _randomise_b(apply_lora(tiny_gpt2(), ["c_attn", "lm_head"], rank=4))
        with pytest.warns(UserWarning, match="now a copy of its own"):
            merged = fn(model)
        head = merged.lm_head.linear if fn is merge_lora else merged.lm_head
        assert head.weight is not merged.transformer.wte.weight
        assert not head.weight.requires_grad, fn.__name__
        if fn is merge_and_unload:
            assert not [n for n, p in merged.named_parameters() if p.requires_grad]


def test_merge_and_unload_leaves_no_lora_fast_record():
    """merge_and_unload gives a plain model, "no lora_fast inside": no LoRA layer, and no ``lora_fast_config``
    still claiming modules_to_save of an adapter that is gone (``modules_saved_whole`` reads it), as ``unload``.
    Kills ``merge_and_unload``: the ``del model.lora_fast_config`` skipped."""
    from lora_fast.inject import modules_saved_whole

    model = apply_lora(tiny_gpt2(), ["c_attn"], rank=2, modules_to_save=["ln_f"])
    assert modules_saved_whole(model) == ["transformer.ln_f"]
    merged = merge_and_unload(model)
    assert not lora_layers(merged) and not hasattr(merged, "lora_fast_config")
    assert modules_saved_whole(merged) == []


def test_unload_of_a_merged_single_layer_gives_back_the_base_weight():
    """``unload(layer)`` of a merged ``LinearWithLoRA`` unmerges first: the returned base computes W₀, not W₀+ΔW.
    Kills ``unload``: ``if model.merged`` (single layer) -> ``if False``."""
    base = nn.Linear(12, 10)
    layer = LinearWithLoRA(copy.deepcopy(base), rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora.lora_B.normal_(0, 0.5)
    layer.merge_weights()
    plain = unload(layer)
    assert plain is layer.linear
    x = torch.randn(5, 12)
    assert_rel_close(plain(x), base(x), 1e-6, "unloaded single layer")


def _switch(**kw):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
        num_layers=1, num_decoder_layers=1, d_model=64, d_kv=16, d_ff=96, num_heads=4, vocab_size=256, num_experts=2,
        encoder_sparse_step=1, decoder_sparse_step=1, **kw)).eval()


def test_merge_and_unload_of_an_untied_flag_reader_does_not_rescale_its_head():
    """A SwitchTransformers built with ``tie_word_embeddings=False`` does not scale its decoder output, so nothing
    moves into the head on merge_and_unload: the merged model computes the adapter's logits.
    Kills ``_fold_decoder_scale``: ``if not config.tie_word_embeddings: return`` skipped."""
    model = _switch(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.shared.weight
    model = _randomise_b(apply_lora(model, ["q", "v", "lm_head"], rank=4))
    ids = torch.randint(0, 256, (2, 9))
    want = _t5_logits(model, ids)
    merged = merge_and_unload(model)
    assert merged.config.tie_word_embeddings is False
    assert_rel_close(_t5_logits(merged, ids), want, 1e-5, "merged untied SwitchTransformers")


@pytest.fixture
def transformers_4_ties(monkeypatch):
    """transformers 4's tie handling on the installed transformers: it has no ``get_expanded_tied_weights_keys``,
    so ``ties_lost_with_flag`` finds nothing and lora_fast clears ``tie_word_embeddings`` (BART), or moves the
    decoder's scale into the head (SwitchTransformers), and copies the ties only the flag made
    (``merge._copy_flag_ties``) — the code paths transformers 5 does not take. Whatever the version, the saved model
    must load with the adapter's logits."""
    import lora_fast.inject
    import lora_fast.merge

    for mod in (lora_fast.inject, lora_fast.merge):
        monkeypatch.setattr(mod, "ties_lost_with_flag", lambda *a, **k: [])


def _reload(model, tmp_path, cls):
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(tmp_path).eval()


@pytest.mark.usefixtures("transformers_4_ties")
def test_the_decoder_scale_moved_into_the_head_keeps_the_logits(tmp_path):
    """merge_and_unload of a SwitchTransformers LoRA head where a cleared flag survives loading: the head takes the
    decoder's d_model**-0.5, every config's flag is cleared (the forward no longer scales), the encoder/decoder
    ``embed_tokens`` that only the flag tied get copies; the merged model, and the one from_pretrained gives back,
    compute the adapter's logits, and nothing is left trainable.
    Kills ``_fold_decoder_scale``: ``d_model ** 0.5``; the flag not cleared (either line); ``CLEARED_TIE`` not set
    (no copies: embed_tokens reload at random)."""
    from transformers import SwitchTransformersForConditionalGeneration

    model = _randomise_b(apply_lora(_switch(), ["q", "v", "lm_head"], rank=4))
    ids = torch.randint(0, 256, (2, 9))
    want = _t5_logits(model, ids)
    with pytest.warns(UserWarning, match=r"d_model\*\*-0.5"):
        merged = merge_and_unload(model)
    assert merged.config.tie_word_embeddings is False
    assert all(not getattr(getattr(m, "config", None), "tie_word_embeddings", False) for m in merged.modules())
    assert_rel_close(_t5_logits(merged, ids), want, 1e-5, "merged, in memory")
    assert not [n for n, p in merged.named_parameters() if p.requires_grad]
    again = _reload(merged, tmp_path, SwitchTransformersForConditionalGeneration)
    assert_rel_close(_t5_logits(again, ids), want, 1e-5, "merged, saved and loaded")


@pytest.mark.usefixtures("transformers_4_ties")
@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_a_bart_whose_flag_was_cleared_reloads_its_embed_tokens(tmp_path, how):
    """BART with ``modules_to_save=["lm_head"]`` where the flag is cleared (transformers 4): encoder and decoder
    ``embed_tokens`` still share ``shared``'s weight in memory only; merge_and_unload and unload give them copies
    (frozen, as the embeddings are), so save_pretrained writes them and the reloaded model computes the logits the
    model computed (the adapter's for merge_and_unload; the trained head over the base for unload).
    Kills ``merge_and_unload``/``unload``: ``copied = _copy_flag_ties(model)`` -> ``[]``; the copies made with
    ``requires_grad=True``."""
    from transformers import BartForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_lora(_tiny_bart(), ["q_proj", "v_proj"], rank=4, modules_to_save=["lm_head"])
    assert model.config.tie_word_embeddings is False
    _randomise_b(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # as trained
    ids = torch.randint(3, 256, (2, 9))
    want = _t5_logits(model, ids)
    with pytest.warns(UserWarning, match="got a copy of the input embeddings of their own"):
        plain = merge_and_unload(model) if how == "merge_and_unload" else unload(model)
    for stack in (plain.model.encoder, plain.model.decoder):
        assert stack.embed_tokens.weight is not plain.model.shared.weight
        assert not stack.embed_tokens.weight.requires_grad
    if how == "unload":  # the adapter is dropped: the trained head over the base
        want = _t5_logits(plain, ids)
    assert_rel_close(_t5_logits(plain, ids), want, 1e-5, f"{how} of BART, in memory")
    again = _reload(plain, tmp_path, BartForConditionalGeneration)
    assert_rel_close(_t5_logits(again, ids), want, 1e-5, f"{how} of BART, saved and loaded")


def test_a_config_that_does_not_round_trip_keeps_its_flag():
    """``_cleared_flag_survives`` of a config that cannot be rebuilt from its dict is False: the scale is then not
    moved (the model is left as it is) rather than assumed to survive.
    Kills ``_cleared_flag_survives``: the ``except`` returning True."""
    from transformers import PretrainedConfig

    from lora_fast.merge import _cleared_flag_survives

    class Strict(PretrainedConfig):
        def __init__(self, needed, **kw):  # from_dict of to_dict() lacks ``needed``: TypeError
            super().__init__(**kw)

    assert _cleared_flag_survives(Strict(needed=1)) is False



# ---------------------------------------------------------------------------------------------------- peft_compat
def _peft_seq(n=2, width=12, seed=0):
    """A PeftModel over ``n`` plain nn.Linear layers (``l0``, ``l1``, ...) with a nonzero adapter, and its copy
    (the unpatched reference)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    seq = nn.Sequential()
    for i in range(n):
        seq.add_module(f"l{i}", nn.Linear(width, width))
    pm = get_peft_model(seq, LoraConfig(r=3, lora_alpha=6, target_modules=[f"l{i}" for i in range(n)])).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return pm, copy.deepcopy(pm)


def _peft_layer(pm, i):
    return getattr(pm.base_model.model, f"l{i}")


def _counting(monkeypatch):
    from lora_fast import peft_compat

    calls, real = [], peft_compat.lora_linear
    monkeypatch.setattr(peft_compat, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("where", ["lora_A", "lora_B"])
@pytest.mark.parametrize("what", ["hook", "subclass"])
def test_adapter_modules_computing_something_else_keep_peft_numbers(monkeypatch, where, what):
    """A forward hook on lora_A or lora_B, or a lora_B of an nn.Linear subclass with its own forward, changes what
    PEFT's layer computes; lora_linear would read only the weights. Such a layer stays on PEFT's path (named in
    the warning) and the patched model's outputs and gradients equal PEFT's.
    Kills ``_state_reason``: the ``calls_more_than_forward(lora_A)`` / ``(lora_B)`` terms dropped; the
    ``type(lora_B).forward is not nn.Linear.forward`` term dropped."""
    from lora_fast import patch_peft
    from lora_fast.peft_compat import is_patched

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    pm, _ = _peft_seq(n=1)
    layer = _peft_layer(pm, 0)
    mod = getattr(layer, where)["default"]
    if what == "hook":
        mod.register_forward_hook(lambda m, i, o: 0.5 * o)
    else:
        new = Doubled(mod.in_features, mod.out_features, bias=False)
        new.weight = mod.weight
        getattr(layer, where)["default"] = new
    ref = copy.deepcopy(pm)
    x = torch.randn(4, 12)
    reason = "hooks or offloaded weights" if what == "hook" else "lora_A/lora_B with their own forward"
    with pytest.warns(UserWarning, match=f"stay on PEFT's own path.*{reason}"):
        patch_peft(pm)
    calls = _counting(monkeypatch)
    assert not is_patched(layer)
    xr = x.clone().requires_grad_()
    x = x.requires_grad_()
    y, y_ref = pm(x), ref(xr)
    assert not calls
    assert_rel_close(y, y_ref, 1e-6, f"{what} on {where}")
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    assert_rel_close(x.grad, xr.grad, 1e-6, "dx")


def test_a_float_scaling_under_torch_compile_keeps_the_fused_path(monkeypatch):
    """Only a scaling held as a tensor (PEFT's compiled hotswap) sends a patched layer to PEFT's forward under
    torch.compile; the usual float scaling keeps lora_fast's path there (what compiling a patched model is for).
    Kills ``_state_reason``: the ``isinstance(module.scaling[a], torch.Tensor)`` term dropped."""
    from lora_fast import patch_peft
    from lora_fast.peft_compat import is_patched

    pm, _ = _peft_seq(n=1)
    layer = _peft_layer(pm, 0)
    patch_peft(pm)
    assert isinstance(layer.scaling["default"], float)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert is_patched(layer)
    layer.scaling["default"] = torch.tensor(layer.scaling["default"])  # prepare_model_for_compiled_hotswap's form
    assert not is_patched(layer)


def test_extra_positional_arguments_go_to_peft():
    """A patched layer called with extra positional arguments does what PEFT's forward does with them (passes them
    to the base layer: nn.Linear refuses them), never the fused path that would drop them silently.
    Kills ``_fast_forward``: ``args`` dropped from the extra-argument check."""
    from lora_fast import patch_peft

    pm, ref = _peft_seq(n=1)
    patch_peft(pm)
    x = torch.randn(3, 12)
    with pytest.raises(TypeError):
        _peft_layer(ref, 0)(x, "extra")
    with pytest.raises(TypeError):
        _peft_layer(pm, 0)(x, "extra")


def test_a_forward_borrowed_from_another_layer_is_left_alone():
    """A layer whose instance ``forward`` is another layer's bound forward (a redirect, not a hook's leftover)
    runs that other layer: patch_peft must neither delete it nor patch the layer, so the model computes what it
    computed before. Kills ``patch_peft``: the ``__self__ is module`` condition on deleting a leftover forward."""
    from lora_fast import patch_peft
    from lora_fast.peft_compat import is_patched

    pm, _ = _peft_seq(n=2)
    l0, l1 = _peft_layer(pm, 0), _peft_layer(pm, 1)
    l1.forward = l0.forward  # l1 now computes l0's layer
    x = torch.randn(3, 12)
    with torch.no_grad():
        want = pm(x)
    with pytest.warns(UserWarning, match="forward already replaced"):
        patch_peft(pm)
    assert "forward" in l1.__dict__ and not is_patched(l1)
    with torch.no_grad():
        assert_rel_close(pm(x), want, 1e-6, "borrowed forward")


def test_a_lora_layer_over_a_base_of_another_type_is_never_patched():
    """A PEFT lora.Linear whose base_layer is not an nn.Linear/Conv1D (here a module computing something else) is
    left as PEFT's class, named with its base's type, and computes what PEFT does.
    Kills ``_structural_reason``: the base-type check dropped (the layer would be patched, waiting)."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from lora_fast import patch_peft
    from lora_fast.peft_compat import is_patched

    class Halved(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.weight, self.bias = lin.weight, lin.bias
            self.in_features, self.out_features = lin.in_features, lin.out_features

        def forward(self, x):
            return 0.5 * nn.functional.linear(x, self.weight, self.bias)

    pm, _ = _peft_seq(n=1)
    layer = _peft_layer(pm, 0)
    layer.base_layer = Halved(layer.base_layer)
    ref = copy.deepcopy(pm)
    with pytest.warns(UserWarning, match="base layer is a Halved, not nn.Linear/Conv1D"):
        patch_peft(pm)
    assert type(layer) is PeftLinear and not is_patched(layer)
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert_rel_close(pm(x), ref(x), 1e-6, "other base")


def test_unpatch_gives_the_layer_back_as_it_was():
    """patch_peft then unpatch_peft leaves each layer as PEFT built it: its class and its attributes (no lora_fast
    attribute left on it).
    Kills ``unpatch_peft``: the backend mark not removed."""
    from lora_fast import patch_peft, unpatch_peft

    pm, _ = _peft_seq(n=2)
    before = {n: (type(m), set(m.__dict__)) for n, m in pm.named_modules()}
    patch_peft(pm, backend="reference")
    unpatch_peft(pm)
    assert {n: (type(m), set(m.__dict__)) for n, m in pm.named_modules()} == before


# -------------------------------------------------------------------------------------------------- checkpointing
def _lora_hooks(model):
    """{module name: number of lora_fast's input-grad hooks on it}."""
    from lora_fast.checkpointing import _hidden_states_require_grad, _outputs_require_grad

    ours = (_outputs_require_grad, _hidden_states_require_grad)
    found = {}
    for name, m in model.named_modules():
        n = sum(h in ours for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
        if n:
            found[name] = n
    return found


def _tiny_vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _qv(model):
    names = {n.rsplit(".", 1)[-1] for n in dict(model.named_modules())}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


def _vit_lora_grads(model, pixels, labels, call=None):
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "None of the inputs have requires_grad" where the hook is missing
        (call or model)(pixels, labels).backward()
    return {n: p.grad for n, p in model.named_parameters() if ".lora.lora_" in n}


def _assert_same_grads(got, want):
    assert got.keys() == want.keys() and len(want) >= 8
    for n, g in want.items():
        assert got[n] is not None, f"{n}: no gradient"
        assert_rel_close(got[n], g.double(), 1e-5, n)


def _vit_loss(model):
    return lambda pixels, labels: model(pixel_values=pixels, labels=labels).loss


def _adapted_vit():
    model = _tiny_vit()
    return _randomise_b(apply_lora(model, _qv(model), rank=4, alpha=8.0, modules_to_save=["classifier"]))


PIXELS, LABELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 2])


def test_a_lost_switch_record_counts_as_reentrant_checkpointing():
    """When the recorded switch holder no longer resolves (the user restructured the model), reentrant checkpointing
    is found by scanning and counted as reentrant ("unknown": the safe side): a ViT, for which transformers adds no
    hook, still gets every LoRA gradient, equal to the run without checkpointing.
    Kills ``_reentrant_checkpointing_on``: ``return checkpointing_on(model)`` -> ``return False``."""
    from lora_fast.checkpointing import PROBE

    model = _adapted_vit()
    plain = copy.deepcopy(model)
    want = _vit_lora_grads(plain, PIXELS, LABELS, _vit_loss(plain))
    model.__dict__[PROBE] = "gone"
    enable_checkpointing(model, use_reentrant=True)
    _assert_same_grads(_vit_lora_grads(model, PIXELS, LABELS, _vit_loss(model)), want)


def test_a_switch_record_naming_a_module_without_the_switch_is_scanned_past():
    """A recorded holder name that now resolves to a module without transformers' switch (the user put another
    module in its place) is not read: the switch is found by scanning, nothing raises.
    Kills ``_switch_of``: the ``hasattr(holder, FLAG)`` condition dropped."""
    from lora_fast.checkpointing import PROBE, checkpointing_on

    model = apply_lora(tiny_gpt2(), ["c_attn"], rank=2)
    model.__dict__[PROBE] = "lm_head"
    assert not checkpointing_on(model)
    enable_checkpointing(model, use_reentrant=True)
    assert checkpointing_on(model)
    model.train()
    model(torch.randint(0, 100, (1, 5)))


def test_the_embeddings_hook_lifts_the_first_tensor_of_a_tuple_output():
    """Swin's patch embeddings return (embeddings, shape): the hook makes the embeddings require grad.
    Kills ``_outputs_require_grad``: a tuple output taken as one (non-tensor) output."""
    from transformers import SwinConfig, SwinForImageClassification

    from lora_fast.checkpointing import _outputs_require_grad

    swin = SwinForImageClassification(SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1],
                                                 num_heads=[2, 2], window_size=2, num_labels=3))
    emb = swin.swin.embeddings.patch_embeddings
    emb.requires_grad_(False)
    emb.register_forward_hook(_outputs_require_grad)
    out = emb(torch.randn(1, 3, 16, 16))
    assert isinstance(out, tuple) and out[0].requires_grad


def test_transformers_4s_disable_removes_every_hook_lora_fast_added():
    """transformers 4's ``disable_input_require_grads`` calls ``_require_grads_hook.remove()`` on one handle; lora_fast
    puts a handle there that removes all of its hooks (Whisper: the encoder's conv1 and the decoder's embeddings).
    Kills ``_AllHandles.remove``: only the first handle removed."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=60, num_mel_bins=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2))
    apply_lora(model, ["q_proj", "v_proj"], rank=2)
    enable_checkpointing(model, use_reentrant=True)
    model.train()
    model(input_features=torch.randn(2, 8, 16), labels=torch.randint(3, 60, (2, 5))).loss.backward()
    assert len(_lora_hooks(model)) >= 2
    model._require_grads_hook.remove()  # what transformers 4's disable_input_require_grads does
    assert _lora_hooks(model) == {}


def test_only_the_input_embeddings_get_the_hook_where_a_model_has_them():
    """A model with input embeddings (ViT) gets one hook, on its embeddings: no pre-hook on blocks, whose extra
    lifted inputs would only add backward work. Kills ``_input_grad_hooks``: the ``PreTrainedModel`` filter
    dropped; the ``continue`` after an embeddings hook dropped."""
    model = _adapted_vit()
    emb = model.get_input_embeddings()
    enable_checkpointing(model, use_reentrant=True)
    _vit_lora_grads(model, PIXELS, LABELS, _vit_loss(model))
    names = {id(m): n for n, m in model.named_modules()}
    assert _lora_hooks(model) == {names[id(emb)]: 1}


def _tiny_wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(8, 8),
        conv_kernel=(3, 3), conv_stride=(2, 2), num_feat_extract_layers=2, vocab_size=12, num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, layerdrop=0.0, mask_time_prob=0.0))
    model.freeze_feature_encoder()
    return model


def test_a_model_without_embeddings_gets_pre_hooks_only_where_lora_layers_are():
    """Wav2Vec2 has no input embeddings: the pre-hooks go on the switch-holding modules that hold a LoRA layer, not
    on the frozen feature encoder (a backward through its convolutions would be wasted), and the gradients equal
    those without checkpointing. Kills ``_input_grad_hooks``: the "holds a LoRA layer" condition dropped."""
    model = apply_lora(_tiny_wav2vec2(), _qv(_tiny_wav2vec2()), rank=4)
    _randomise_b(model)
    inputs = {"input_values": torch.randn(2, 400), "labels": torch.randint(1, 12, (2, 4))}
    plain = copy.deepcopy(model).train()
    torch.manual_seed(1)  # the same dropout masks in both runs (checkpointing replays them)
    plain(**inputs).loss.backward()
    enable_checkpointing(model, use_reentrant=True)
    model.train()
    torch.manual_seed(1)
    model(**inputs).loss.backward()
    hooked = _lora_hooks(model)
    assert hooked and not [n for n in hooked if "feature_extractor" in n], hooked
    for n, p in plain.named_parameters():
        if ".lora.lora_" in n:
            assert_rel_close(dict(model.named_parameters())[n].grad, p.grad.double(), 1e-5, n)


def test_the_hidden_states_pre_hook_lifts_only_hidden_states():
    """The pre-hook makes ``hidden_states`` (positional or keyword) require grad, as a detached copy, and passes
    every other argument (a float attention mask here) through untouched.
    Kills ``_hidden_states_require_grad``: the name test dropped for positional or for keyword arguments."""
    from lora_fast.checkpointing import _hidden_states_require_grad

    encoder = _tiny_wav2vec2().wav2vec2.encoder
    hidden, mask = torch.randn(2, 5, 32), torch.ones(2, 5)
    args, kwargs = _hidden_states_require_grad(encoder, (hidden, mask), {})
    assert args[0].requires_grad and not hidden.requires_grad and torch.equal(args[0], hidden)
    assert args[1] is mask and not mask.requires_grad
    args, kwargs = _hidden_states_require_grad(encoder, (), {"hidden_states": hidden, "attention_mask": mask})
    assert args == () and kwargs["hidden_states"].requires_grad
    assert kwargs["attention_mask"] is mask and not mask.requires_grad


def test_the_users_disable_input_require_grads_survives_another_apply_lora():
    """After the user's ``disable_input_require_grads()``, the input embeddings' hook is not added again, also when a
    later ``apply_lora`` (which watches the model again) finds reentrant checkpointing on.
    Kills ``_add_input_grads``: the "asked for once" (``ADDED``) check dropped."""
    model = apply_lora(tiny_gpt2(), ["c_attn"], rank=2)
    ids = torch.randint(0, 100, (1, 5))
    enable_checkpointing(model, use_reentrant=True)
    model.train()
    model(ids)
    model.disable_input_require_grads()
    apply_lora(model, ["c_fc"], rank=2)
    seen = []
    model.transformer.wte.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad" (what the user asked for)
        model(ids)
    assert seen == [False]


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


class _FrozenConditionedViT(nn.Module):
    """A user's module: a frozen GPT-2 conditioning encoder first (it has transformers' switch; its c_attn is no
    query/value target), then the ViT backbone that gets the adapter."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Model

        torch.manual_seed(0)
        self.cond = GPT2Model(_gpt2_config())
        self.backbone = _tiny_vit()

    def forward(self, pixels, labels):
        c = self.cond(input_ids=torch.arange(4).unsqueeze(0)).last_hidden_state.mean()
        return self.backbone(pixel_values=pixels, labels=labels).loss + 0.0 * c


@pytest.mark.parametrize("cond_checkpointed", [False, True])
def test_a_users_wrapper_watches_its_adapted_backbone_only(cond_checkpointed):
    """A user's wrapper (not a PreTrainedModel) is watched through each adapted backbone with its own switch: the
    ViT backbone checkpointed (reentrant) gets every LoRA gradient, whatever the frozen encoder before it does, and
    the frozen encoder gets no hook even when it is checkpointed too (its backward would be wasted).
    Kills ``watch_checkpointing``: the wrapper branch skipped (the first switch found, the frozen encoder's, is
    read); ``_adapted_transformers_models``: the LoRA filter dropped."""
    model = _FrozenConditionedViT()
    apply_lora(model, _qv(model.backbone), rank=4, alpha=8.0)
    _randomise_b(model)
    plain = copy.deepcopy(model)
    want = _vit_lora_grads(plain, PIXELS, LABELS)
    enable_checkpointing(model.backbone, use_reentrant=True)
    if cond_checkpointed:
        enable_checkpointing(model.cond, use_reentrant=True)
        if model.cond.__dict__.get("_require_grads_hook") is not None:  # transformers 5's own, for input_ids models
            model.cond.disable_input_require_grads()
    _assert_same_grads(_vit_lora_grads(model, PIXELS, LABELS), want)
    assert not [n for n in _lora_hooks(model) if n.startswith("cond")]


def test_a_quantised_model_is_not_watched():
    """Quantised models are left to PEFT's ``prepare_model_for_kbit_training``: no lora_fast pre-hook, no
    embeddings hook. Kills ``watch_checkpointing``: the quantised-flags check dropped."""
    from lora_fast.checkpointing import _input_grads_when_checkpointing

    model = _tiny_vit()
    model.is_loaded_in_8bit = True
    apply_lora(model, _qv(model), rank=2)
    assert _input_grads_when_checkpointing not in model._forward_pre_hooks.values()


def test_a_transformers_model_without_a_switch_trains():
    """A PreTrainedModel with no checkpointing switch anywhere is not watched, and its adapter trains.
    Kills ``watch_checkpointing``: the "no switch holder" return dropped (the recorded name was None and every
    training forward raised)."""
    from transformers import PretrainedConfig, PreTrainedModel

    class NoSwitchConfig(PretrainedConfig):
        model_type = "lora_fast_no_switch"

    class NoSwitch(PreTrainedModel):
        config_class = NoSwitchConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(8, 8)
            self.post_init()

        def forward(self, x):
            return self.proj(x)

    model = apply_lora(NoSwitch(NoSwitchConfig()), ["proj"], rank=2).train()
    model(torch.randn(3, 8)).sum().backward()
    assert model.proj.lora.lora_B.grad is not None


def test_the_watching_pre_hook_is_registered_once():
    """Each ``apply_lora`` watches the model again; the pre-hook is registered once per model.
    Kills ``watch_checkpointing``: the "already registered" check dropped."""
    from lora_fast.checkpointing import _input_grads_when_checkpointing

    model = apply_lora(tiny_gpt2(), ["c_attn"], rank=2)
    apply_lora(model, ["c_fc"], rank=2)
    hooks = [h for h in model._forward_pre_hooks.values() if h is _input_grads_when_checkpointing]
    assert len(hooks) == 1


def test_checkpointing_already_on_gets_the_hook_at_apply_lora():
    """Reentrant checkpointing switched on before ``apply_lora``: the embeddings' hook goes in at once (as PEFT's
    get_peft_model does), so the backbone called directly (not the top model, whose pre-hook would add it) gets
    every LoRA gradient. Kills ``watch_checkpointing``: the immediate ``_add_input_grads`` dropped."""
    model = _tiny_vit()
    targets = _qv(model)
    enable_checkpointing(model, use_reentrant=True)
    apply_lora(model, targets, rank=4, alpha=8.0)
    _randomise_b(model)
    plain = copy.deepcopy(model)
    for m in plain.modules():  # the reference: the same model without checkpointing
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = False

    def backbone_loss(m):
        return lambda pixels, labels: m.vit(pixel_values=pixels).last_hidden_state.square().mean()

    want = _vit_lora_grads(plain, PIXELS, LABELS, backbone_loss(plain))
    _assert_same_grads(_vit_lora_grads(model, PIXELS, LABELS, backbone_loss(model)), want)


def test_enable_checkpointing_uses_the_versions_own_name():
    """enable_checkpointing calls the method of the installed transformers' own name (no deprecation warning).
    Kills ``enable_checkpointing``: ``gradient_checkpointing_enable`` always."""
    model = apply_lora(tiny_gpt2(), ["c_attn"], rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_checkpointing(model, use_reentrant=False)
    from lora_fast.checkpointing import checkpointing_on

    assert checkpointing_on(model)


def test_a_checkpoint_function_of_another_kind_counts_as_reentrant():
    """Checkpointing switched on with a checkpoint function that is not transformers' partial (one a framework put in
    its place, as DeepSpeed does; here a reentrant ``torch.utils.checkpoint`` call) is "unknown": counted as
    reentrant, so the embeddings' hook goes in and every LoRA weight of a ViT gets its gradient.
    Kills ``_reentrant_checkpointing_on``: the ``isinstance(keywords, dict)`` test dropped (``None.get`` raised at
    every training forward)."""
    from torch.utils.checkpoint import checkpoint

    def reentrant(fn, *args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=True, **kwargs)

    model = _adapted_vit()
    plain = copy.deepcopy(model)
    want = _vit_lora_grads(plain, PIXELS, LABELS, _vit_loss(plain))
    enable_checkpointing(model, use_reentrant=True)
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = reentrant
    _assert_same_grads(_vit_lora_grads(model, PIXELS, LABELS, _vit_loss(model)), want)


def test_a_wrapped_encoder_decoder_is_watched_as_one_model():
    """A user's module around a SpeechEncoderDecoderModel: only the outermost transformers model is watched, so each
    tower gets one hook, and that model's ``disable_input_require_grads()`` removes every one of them.
    Kills ``_adapted_transformers_models``: the "not inside one found already" condition dropped (the inner models
    were watched too: hooks twice and thrice, and the user's disable left half of them)."""
    from transformers import BertConfig, SpeechEncoderDecoderConfig, SpeechEncoderDecoderModel

    encoder = _tiny_wav2vec2()
    torch.manual_seed(0)
    speech = SpeechEncoderDecoderModel(config=SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        encoder.config, BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16, is_decoder=True,
                                   add_cross_attention=True), decoder_start_token_id=1, pad_token_id=0))
    speech.freeze_feature_encoder()
    model = nn.ModuleDict({"speech": speech})
    apply_lora(model, ["q_proj", "v_proj", "query", "value"], rank=4)
    enable_checkpointing(speech, use_reentrant=True)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: use_cache turned off under checkpointing
        speech(input_values=torch.randn(2, 400), labels=torch.randint(3, 60, (2, 4))).loss.backward()
    hooked = _lora_hooks(model)
    assert hooked and set(hooked.values()) == {1}, hooked
    speech.disable_input_require_grads()
    assert _lora_hooks(model) == {}


# -------------------------------------------------------------------------------------------------- adapter_files
def _adapter_pair(rank=4, alpha=8.0):
    """(base model, adapted copy with a nonzero adapter) on the tiny GPT-2."""
    base = tiny_gpt2()
    model = _randomise_b(apply_lora(copy.deepcopy(base), ["c_attn"], rank=rank, alpha=alpha))
    return base, model


def _loaded_logits(base, directory, ids):
    from lora_fast import load_adapter

    fresh = copy.deepcopy(base)
    load_adapter(fresh, directory)
    return _logits(fresh, ids)


def test_saved_files_get_the_mode_a_plain_open_gives(tmp_path):
    """The adapter's files are written through mkstemp (mode 0600) and then given the mode ``open()`` would give
    under the process's umask, so a shared adapter directory stays readable by whom it would be.
    Kills ``_atomic_write_all``: the ``fchmod`` skipped; ``0o600`` in place of ``0o666 & ~umask``."""
    import os
    import stat

    from lora_fast import save_adapter

    _, model = _adapter_pair()
    save_adapter(model, tmp_path / "a")
    with open(tmp_path / "plain", "w") as fh:
        fh.write("x")
    want = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / "a" / name).st_mode) == want, name


def test_a_symlink_where_a_file_goes_is_replaced_not_refused(tmp_path):
    """A symbolic link at a file's name, even one to a directory, is not a directory in the way: the save replaces
    the link (a rename onto a link replaces the link) and leaves the directory it pointed to alone.
    Kills ``_atomic_write_all``: the ``not is_symlink()`` exemption dropped from the directory check."""
    import os

    from lora_fast import save_adapter

    base, model = _adapter_pair()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("kept")
    target = tmp_path / "adapter"
    target.mkdir()
    os.symlink(tmp_path / "elsewhere", target / "adapter_config.json")
    save_adapter(model, target)
    assert (target / "adapter_config.json").is_file() and not (target / "adapter_config.json").is_symlink()
    assert os.listdir(tmp_path / "elsewhere") == ["keep"]
    ids = torch.randint(0, 100, (2, 7))
    assert_rel_close(_loaded_logits(base, target, ids), _logits(model, ids), 1e-5, "saved over a link")


def test_a_changed_config_of_the_same_length_is_written():
    """A save whose config differs from the one on disk only in content, not in length (alpha 16 -> 32), writes
    it: the reloaded adapter has the new scaling. Kills ``_same_bytes``: the content comparison dropped (equal
    sizes taken for equal files)."""
    import json
    import tempfile
    from pathlib import Path

    from lora_fast import save_adapter

    base, model = _adapter_pair(alpha=16.0)
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)
        for layer in lora_layers(model).values():
            layer.lora.alpha, layer.lora.scaling = 32.0, 32.0 / layer.rank
        save_adapter(model, d)
        assert json.loads((Path(d) / "adapter_config.json").read_text())["lora_alpha"] == 32
        ids = torch.randint(0, 100, (2, 7))
        assert_rel_close(_loaded_logits(base, Path(d), ids), _logits(model, ids), 1e-5, "alpha 32")


def test_a_non_contiguous_adapter_weight_saves_and_loads(tmp_path):
    """An adapter weight held as a non-contiguous tensor (a transposed view made a Parameter) is saved as its
    values: safetensors refuses strided storage, so the copy is made contiguous.
    Kills ``_gather_full``: ``.contiguous()`` dropped."""
    from lora_fast import save_adapter

    base, model = _adapter_pair()
    layer = next(iter(lora_layers(model).values()))
    b = layer.lora.lora_B.detach()
    layer.lora.lora_B = nn.Parameter(b.t().contiguous().t())
    assert not layer.lora.lora_B.is_contiguous()
    save_adapter(model, tmp_path)
    ids = torch.randint(0, 100, (2, 7))
    assert_rel_close(_loaded_logits(base, tmp_path, ids), _logits(model, ids), 1e-5, "non-contiguous B")


def test_a_config_that_is_no_json_object_is_refused_naming_it(tmp_path):
    """adapter_config.json holding a list (not an object) is refused with a ValueError naming the file.
    Kills ``_read_json``: the object check dropped."""
    from lora_fast import load_adapter, save_adapter

    base, model = _adapter_pair()
    save_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"adapter_config.json must hold a JSON object, got list"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_the_safetensors_file_is_read_where_a_bin_lies_beside_it(tmp_path):
    """A directory with both adapter_model.safetensors and adapter_model.bin (another adapter's weights): PEFT
    reads the safetensors file, and so does load_adapter. Kills ``_read_adapter``: the .bin read first."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from lora_fast import save_adapter

    base, model = _adapter_pair()
    save_adapter(model, tmp_path)
    other = {k: torch.randn_like(v) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    torch.save(other, tmp_path / "adapter_model.bin")
    ids = torch.randint(0, 100, (2, 7))
    ours = _loaded_logits(base, tmp_path, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_rel_close(ours, _logits(peft_model, ids), 1e-5, "PEFT's choice of file")
    assert_rel_close(ours, _logits(model, ids), 1e-5, "the saved adapter")


def test_a_legacy_bin_with_an_empty_config_takes_the_json_beside_it(tmp_path):
    """A tutorial .bin whose embedded 'config' is empty carries no settings: the adapter_config.json beside it is
    the config (its r and alpha, not PEFT's defaults). Kills ``_read_adapter``: an empty embedded config taken as
    the config."""
    from lora_fast import save_adapter

    base, model = _adapter_pair(rank=4, alpha=16.0)
    save_adapter(model, tmp_path)
    lora_sd = {k: v for k, v in model.state_dict().items() if ".lora.lora_" in k}
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"lora_state_dict": lora_sd, "config": {}}, tmp_path / "adapter_model.bin")
    ids = torch.randint(0, 100, (2, 7))
    assert_rel_close(_loaded_logits(base, tmp_path, ids), _logits(model, ids), 1e-5, "legacy bin, config beside")


@pytest.mark.parametrize("content", ["list", "non-tensor"])
def test_a_bin_that_is_no_dict_of_tensors_is_refused_naming_it(tmp_path, content):
    """adapter_model.bin holding a list of tensors, or a dict with a value that is no tensor, is refused with a
    ValueError naming the file. Kills ``_read_adapter``: the state check dropped (whole, or its dict test)."""
    from lora_fast import load_adapter, save_adapter

    base, model = _adapter_pair()
    save_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    key = next(k for k in model.state_dict() if ".lora.lora_" in k)
    obj = [torch.zeros(2)] if content == "list" else {key: 1.0}
    torch.save(obj, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin must hold a dict of tensors keyed by name"):
        load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_model.bin"])
def test_a_truncated_weights_file_is_refused_naming_it(tmp_path, name):
    """A weights file cut short (an interrupted copy) is refused with a ValueError naming it, not the reader's own
    error type. Kills ``_read_adapter``: ``except Exception`` narrowed to ``OSError`` for either file."""
    from lora_fast import load_adapter, save_adapter

    base, model = _adapter_pair()
    save_adapter(model, tmp_path)
    if name == "adapter_model.bin":
        from safetensors.torch import load_file

        torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / name)
        (tmp_path / "adapter_model.safetensors").unlink()
    data = (tmp_path / name).read_bytes()
    for cut in (len(data) // 2, 10):  # torch.load: an OSError, then a RuntimeError ("not a ZIP archive")
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"{name}"):
            load_adapter(copy.deepcopy(base), tmp_path)


def test_a_layers_own_merge_of_a_tied_head_writes_into_the_shared_weight_as_the_warning_says():
    """``LinearWithLoRA.merge_weights()`` on a tied GPT-2 ``lm_head`` has no model to untie in: it writes ΔW into
    the weight ``wte`` shares (as PEFT's layer-level merge does), so the input embeddings change too; only
    ``merge_lora``/``merge_and_unload`` cut the tie first. apply_lora's tie warning says both."""
    base = tiny_gpt2()
    with pytest.warns(UserWarning, match=r"the layer's own merge_weights\(\) does not"):
        model = _randomise_b(apply_lora(copy.deepcopy(base), ["lm_head"], rank=4, alpha=8.0))
    wte = model.transformer.wte.weight.detach().clone()
    model.lm_head.merge_weights()
    assert model.lm_head.linear.weight is model.transformer.wte.weight
    assert_rel_close(model.transformer.wte.weight - wte, model.lm_head.lora.delta_weight().double(), 1e-5, "ΔW")
