"""After training (``lora_fast.merge``): merge/unmerge warnings and safe_merge, ``unload`` and ``disable_adapter``
against the base model they must reproduce, and errors instead of silent no-ops."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from lora_fast import (
    LinearWithLoRA,
    apply_lora,
    disable_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unload,
    unmerge_lora,
)
from tests.test_inject import TARGETS, tiny_gpt2
from tests.utils import MISSING, assert_rel_close, transformers_major


def _trained(dropout=0.0):
    """(base copy, LoRA model with nonzero B) — the base copy is the oracle for 'adapter off'."""
    base = tiny_gpt2()
    model = apply_lora(copy.deepcopy(base), TARGETS, rank=4, alpha=8.0, dropout=dropout).eval()  # new layers train
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.lora_B.normal_(0, 0.1)
    return base, model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.usefixtures("one_thread")  # exact comparisons of repeated forwards: one thread's GEMMs
def test_disable_adapter_gives_the_base_model_and_restores_on_exit():
    base, model = _trained(dropout=0.3)
    ids = torch.randint(0, 101, (2, 9))
    with_lora, base_out = _logits(model, ids), _logits(base, ids)
    assert (with_lora - base_out).abs().max() > 1e-3  # the adapter changes the output
    with disable_adapter(model) as m:
        assert m is model
        torch.testing.assert_close(_logits(model, ids), base_out, rtol=0, atol=0)
        with disable_adapter(model):  # nested
            torch.testing.assert_close(_logits(model, ids), base_out, rtol=0, atol=0)
        torch.testing.assert_close(_logits(model, ids), base_out, rtol=0, atol=0)  # still off after the inner exit
        model.train()  # train mode inside: no LoRA dropout either, the LoRA weights take no part in the graph
        out = model(ids).logits
        torch.testing.assert_close(out, base_out, rtol=0, atol=0)
        assert out.grad_fn is None  # only the (frozen) base computed it
        model.eval()
    torch.testing.assert_close(_logits(model, ids), with_lora, rtol=0, atol=0)
    with pytest.raises(KeyError), disable_adapter(model):
        raise KeyError("inside")
    torch.testing.assert_close(_logits(model, ids), with_lora, rtol=0, atol=0)  # back on after an exception


def test_disable_adapter_refuses_merged_layers_and_a_merge_inside():
    base, model = _trained()
    ids = torch.randint(0, 101, (1, 5))
    merge_lora(model)
    with pytest.raises(ValueError, match=r"merged \(transformer\.h\.0\..*unmerge_lora\(model\) first"):
        with disable_adapter(model):
            pass
    unmerge_lora(model)
    with disable_adapter(model):
        merge_lora(model)
        with pytest.raises(RuntimeError, match="disabled but merged"):
            model(ids)  # never the merged weight passed off as the base
        unmerge_lora(model)
        assert_rel_close(_logits(model, ids), _logits(base, ids).double(), 1e-6, "after unmerge")



@pytest.mark.parametrize("how", ["apply_lora", "load_adapter"])
def test_disable_adapter_refuses_modules_to_save(tmp_path, how):
    """modules_to_save are trained in place: with the adapters off, the trained head would still run (logits 0.5 off
    the base on this model, silently: PEFT switches back to the original it keeps). Refused, naming the module,
    whether the head came from apply_lora or from a loaded adapter; nothing is switched off."""
    from lora_fast import load_adapter, save_adapter

    base = tiny_gpt2()
    model = apply_lora(copy.deepcopy(base), TARGETS, rank=4, modules_to_save=["ln_f"])
    if how == "load_adapter":
        save_adapter(model, tmp_path)
        model = copy.deepcopy(base)
        load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"disable_adapter: transformer.ln_f is trained whole \(modules_to_save\)"):
        with disable_adapter(model):
            pass
    assert not any(m.disabled for m in lora_layers(model).values())

def test_unload_restores_the_base_modules_and_drops_the_adapter():
    base, model = _trained()
    ids = torch.randint(0, 101, (2, 7))
    merge_lora(model)  # merged layers are unmerged first
    plain = unload(model)
    assert plain is model and not lora_layers(plain) and not hasattr(plain, "lora_fast_config")
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D
    assert_rel_close(_logits(plain, ids), _logits(base, ids).double(), 1e-6, "unloaded")
    apply_lora(plain, ["c_attn"], rank=16)  # a different adapter can go on now
    assert {m.rank for m in lora_layers(plain).values()} == {16}
    layer = LinearWithLoRA(nn.Linear(6, 4), rank=2)
    assert unload(layer) is layer.linear


def test_unload_says_that_modules_trained_whole_stay_trained():
    """unload keeps modules_to_save as trained (PEFT's too): the model is not the base again, and a later
    load_adapter cannot tell (the record is gone). The README said "back to the plain base model"; a warning names
    them now."""
    model = apply_lora(tiny_gpt2(), ["c_attn"], rank=2, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # trained
    with pytest.warns(UserWarning, match=r"unload: lm_head \(modules_to_save\) keep their trained weights.*freshly "
                                         r"loaded base"):
        unload(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unload(apply_lora(tiny_gpt2(), ["c_attn"], rank=2))  # nothing trained whole: nothing to say


def test_nothing_to_do_warns_and_no_lora_layer_is_an_error():
    _, model = _trained()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_lora(model)
    with pytest.warns(UserWarning, match="merge_lora: every LoRA layer is already merged"):
        merge_lora(model)
    unmerge_lora(model)
    with pytest.warns(UserWarning, match="unmerge_lora: no LoRA layer is merged"):
        unmerge_lora(model)
    # Some layers merged, others not: there is work to do, so no warning, and every layer ends merged.
    first = next(iter(lora_layers(model).values()))
    first.merge_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    first.unmerge_weights()  # and the mirror: one merged layer is something to unmerge
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unmerge_lora(model)
    assert not any(m.merged for m in lora_layers(model).values())
    plain = tiny_gpt2()
    for fn in (merge_lora, unmerge_lora, merge_and_unload, unload):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: GPT2LMHeadModel has no lora_fast LoRA layer"):
            fn(plain)
    with pytest.raises(ValueError, match="disable_adapter: GPT2LMHeadModel has no lora_fast LoRA layer"):
        with disable_adapter(plain):
            pass


def test_safe_merge_refuses_non_finite_weights_untouched():
    """A refusal names the layer and leaves the whole model as it was: every layer is checked before any is
    merged, so the layers before the failing one are not merged either (PEFT leaves those merged)."""
    with pytest.warns(UserWarning, match="tied"):  # lm_head too: a merge would untie it from wte first
        model = apply_lora(tiny_gpt2(), TARGETS + ["lm_head"], rank=4, alpha=8.0)
    bad = "transformer.h.1.mlp.c_fc"
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.lora_B.normal_(0, 0.1)
        lora_layers(model)[bad].lora.lora_B[0, 0] = float("inf")
    state_before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def assert_untouched():
        assert not any(m.merged for m in lora_layers(model).values())
        after = model.state_dict()
        assert after.keys() == state_before.keys()
        for k, v in state_before.items():
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
        assert model.lm_head.linear.weight is model.transformer.wte.weight  # the tie: nothing untied either

    assert list(lora_layers(model)).index(bad) > 0  # layers come before the failing one
    with pytest.raises(ValueError, match=rf"merge_lora: {bad}: .*inf/NaN"):
        merge_lora(model, safe_merge=True)
    assert_untouched()
    with pytest.raises(ValueError, match=rf"merge_and_unload: {bad}: .*inf/NaN"):
        merge_and_unload(model, safe_merge=True)
    assert len(lora_layers(model)) == 2 * len(TARGETS) + 3  # nothing replaced
    assert_untouched()
    w_before = lora_layers(model)[bad].linear.weight.detach().clone()
    layer = lora_layers(model)[bad]  # a single LinearWithLoRA given to merge_and_unload is checked too
    with pytest.raises(ValueError, match="inf/NaN"):
        merge_and_unload(layer, safe_merge=True)
    assert not layer.merged
    torch.testing.assert_close(layer.linear.weight, w_before, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="lm_head .* is now a copy of its own"):
        merge_lora(model)  # without safe_merge the non-finite weight is merged, as PEFT does
    assert not torch.isfinite(lora_layers(model)[bad].linear.weight).all()
    good = lora_layers(model)["transformer.h.0.attn.c_attn"]  # a merged layer's merged_weight: its weight, as is
    torch.testing.assert_close(good.merged_weight(), good.linear.weight, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_an_update_while_merged_does_not_leak_into_the_base_on_unmerge(kind):
    """backward, merge (for an evaluation, say), optimizer step, unmerge: unmerge used to subtract the *new* ΔW,
    leaving W₀ off by the step's change (PEFT has the same gap). It subtracts what was merged: W₀ comes back, the
    adapter keeps its step, and the layer computes W₀ + the new ΔW. A training-mode forward while merged warns
    that the adapter gets no gradient (it used to fail later with torch's generic message)."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    layer = LinearWithLoRA(base, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora.lora_B.normal_(0, 0.5)
    w0 = layer.linear.weight.detach().clone()
    opt = torch.optim.SGD(layer.lora.parameters(), lr=1.0)
    x = torch.randn(6, 12)
    layer(x).pow(2).sum().backward()
    layer.merge_weights()
    with pytest.warns(UserWarning, match="merged layer: the adapter gets no gradient"):
        layer(x)
    a_before = layer.lora.lora_A.detach().clone()
    opt.step()
    assert not torch.equal(layer.lora.lora_A, a_before)  # the step changed the adapter while merged
    layer.unmerge_weights()
    assert_rel_close(layer.linear.weight, w0, 1e-6, "W0 after unmerge")
    layer.eval()
    want = base(x) + layer.lora.scaling * x @ layer.lora.lora_A.T @ layer.lora.lora_B.T
    assert_rel_close(layer(x), want, 1e-6, "W0 + the new ΔW")


def test_unload_refuses_a_lora_layer_compiled_on_its_own():
    """torch.compile of a LoRA layer itself binds the compiled forward to that layer: taking the layer out would
    leave the LoRA term running (unload) or only by accident right (merge_and_unload). Refused, model unchanged."""
    _, model = _trained()
    attn = model.transformer.h[0].attn
    attn.c_attn = torch.compile(attn.c_attn, backend="eager")
    for fn in (unload, merge_and_unload):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: transformer.h.0.attn.c_attn compile the LoRA layer"):
            fn(model)
        assert type(attn.c_attn).__name__ == "OptimizedModule" and len(lora_layers(model)) == 2 * len(TARGETS) + 2
        assert not any(m.merged for m in lora_layers(model).values())


@pytest.mark.parametrize("how", ["merge_lora", "merge_and_unload"])
def test_merging_a_tied_lm_head_leaves_the_input_embeddings_alone(tmp_path, how):
    """GPT-2's lm_head shares its weight with wte. ΔW folded into the shared tensor would change the input
    embeddings too (logits off by ~2 on this model); merging first gives lm_head a copy of its own, warns, and sets
    tie_word_embeddings False, so the merged model, and the one save_pretrained/from_pretrained gives back,
    compute the adapter's logits."""
    from transformers import GPT2LMHeadModel

    base = tiny_gpt2()
    model = apply_lora(copy.deepcopy(base), ["c_attn", "lm_head"], rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.lora_B.normal_(0, 0.1)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    want, embeddings = _logits(model, ids), model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"lm_head \(was tied to transformer.wte.weight\) is now a copy of its own"):
        merged = merge_lora(model) if how == "merge_lora" else merge_and_unload(model)
    assert torch.equal(merged.transformer.wte.weight, embeddings)
    assert merged.config.tie_word_embeddings is False
    assert_rel_close(_logits(merged, ids), want, 1e-5, f"{how} of a tied lm_head")
    if how == "merge_lora":
        unmerge_lora(merged)
        assert_rel_close(_logits(merged, ids), want, 1e-5, "unmerged after the untie")
        return
    merged.save_pretrained(tmp_path)
    again = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight is not again.transformer.wte.weight
    assert_rel_close(_logits(again, ids), want, 1e-5, "merged tied lm_head after save_pretrained/from_pretrained")


@pytest.mark.parametrize("how", ["apply_lora", "load_adapter"])
def test_a_trained_head_untied_from_the_embeddings_is_not_tied_again(tmp_path, how):
    """``modules_to_save=["lm_head"]`` on GPT-2 gives lm_head a weight of its own (PEFT trains a copy). The config
    must then say so: with ``tie_word_embeddings`` still True, transformers' ``tie_weights()`` (which
    ``resize_token_embeddings`` calls) put wte's weight back in place of the trained head, and a merged model saved
    with that flag claimed a tie its weights no longer have. Untied here, the trained head survives both."""
    from lora_fast import load_adapter, save_adapter

    base = tiny_gpt2()
    assert base.config.tie_word_embeddings and base.lm_head.weight is base.transformer.wte.weight
    with pytest.warns(UserWarning, match="tie_word_embeddings set to False"):
        model = apply_lora(copy.deepcopy(base), ["c_attn"], rank=4, modules_to_save=["lm_head"])
    if how == "load_adapter":
        with torch.no_grad():
            model.lm_head.weight.add_(0.5)
        save_adapter(model, tmp_path / "adapter")
        model = copy.deepcopy(base)
        with pytest.warns(UserWarning, match="tie_word_embeddings set to False"):
            load_adapter(model, tmp_path / "adapter")
    else:
        with torch.no_grad():
            model.lm_head.weight.add_(0.5)  # "trained"
    head, embeddings = model.lm_head.weight.detach().clone(), base.transformer.wte.weight.detach().clone()
    assert model.config.tie_word_embeddings is False
    assert not torch.equal(head, embeddings)
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.transformer.wte.weight, embeddings)
    merged = merge_and_unload(model)
    assert merged.config.tie_word_embeddings is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers warns about a claimed tie the weights do not have
        merged.save_pretrained(tmp_path / "merged")
    from transformers import GPT2LMHeadModel

    again = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    assert torch.equal(again.lm_head.weight, head) and torch.equal(again.transformer.wte.weight, embeddings)


def test_the_tie_flag_stays_where_the_embeddings_stay_tied():
    """Untying something else (a head that is not the output embeddings) leaves ``tie_word_embeddings`` alone:
    the flag may only follow the embeddings' own tie."""
    from lora_fast.inject import untie_embeddings_in_config

    model = tiny_gpt2()
    assert untie_embeddings_in_config(model) == "" and model.config.tie_word_embeddings is True
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    assert "set to False" in untie_embeddings_in_config(model) and model.config.tie_word_embeddings is False
    assert untie_embeddings_in_config(nn.Linear(2, 2)) == ""  # no embeddings to speak of


def _tiny_flag_reader():
    """A model whose forward reads ``config.tie_word_embeddings`` in every transformers version tested:
    SwitchTransformers (UMT5's stopped in 5.24, which reads ``scale_decoder_outputs`` as T5's does since 5.0)."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
        num_layers=1, num_decoder_layers=1, d_model=64, d_kv=16, d_ff=96, num_heads=4, vocab_size=256, num_experts=2,
        encoder_sparse_step=1, decoder_sparse_step=1)).eval()


def _tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=256, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("case", ["LoRA on lm_head", "modules_to_save"])
def test_a_merged_bart_head_reloads_with_its_input_embeddings(case, tmp_path):
    """BART's tie_word_embeddings also ties encoder/decoder embed_tokens to shared (transformers 5): clearing it
    after untying the head made save_pretrained write shared once and from_pretrained load both embed_tokens at
    random (logits 100 % off). The flag stays True there. transformers 4 ties the head back when the flag is set
    and embed_tokens only when it is: there the flag is cleared and embed_tokens get copies of their own, which
    save_pretrained writes. Either way the reloaded model computes the adapter's logits."""
    from transformers import BartForConditionalGeneration

    base = _tiny_bart()
    ids = torch.randint(3, 256, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "LoRA on lm_head":
            model = apply_lora(base, ["q_proj", "v_proj", "lm_head"], rank=4)
        else:
            model = apply_lora(base, ["q_proj", "v_proj"], rank=4, modules_to_save=["lm_head"])
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora.lora_B.normal_(0, 0.1)
            model.get_output_embeddings().weight.mul_(1.5)
        want = _t5_logits(model, ids)
        merged = merge_and_unload(model)
    merged.save_pretrained(tmp_path)
    again = BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    for stack in (again.model.encoder, again.model.decoder):  # tied (5: the flag stays) or saved copies (4)
        assert torch.equal(stack.embed_tokens.weight, again.model.shared.weight)
    assert_rel_close(_t5_logits(again, ids), want, 1e-5, f"merged BART after save/load, {case}")


def test_unload_keeps_a_trained_bart_head_that_reloads(tmp_path):
    """unload after modules_to_save=["lm_head"]: the head trained whole stays (PEFT's unload keeps it too) and the
    saved model reloads with it and with its input embeddings (transformers 4: the flag cleared at apply_lora no
    longer tied embed_tokens to shared, which reloaded at random; unload now gives them copies, as
    merge_and_unload does)."""
    from transformers import BartForConditionalGeneration

    model = _tiny_bart()
    ids = torch.randint(3, 256, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(model, ["q_proj", "v_proj"], rank=4, modules_to_save=["lm_head"])
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)  # as trained
        plain = unload(model)
    want = _t5_logits(plain, ids)
    plain.save_pretrained(tmp_path)
    again = BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_rel_close(_t5_logits(again, ids), want, 1e-5, "unloaded BART after save/load")


def test_unload_says_when_transformers_4_would_tie_a_trained_head_back():
    """SwitchTransformers keeps tie_word_embeddings set beside a head trained whole (its forward scales by the flag);
    unload does not change that (adapters may be loaded again), but on transformers 4, whose from_pretrained ties a
    flagged head back to the embeddings, it says so and points at merge_and_unload. transformers 5 keeps the saved
    head."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_lora(_tiny_flag_reader(), ["q", "v"], rank=4, modules_to_save=["lm_head"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unload(model)
    said = [str(w.message) for w in caught if "tie the head back" in str(w.message)]
    assert len(said) == (1 if transformers_major() < 5 else 0), said
    assert all("merge_and_unload" in m for m in said)


def _t5_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits


def test_untying_keeps_the_tie_flag_where_forward_reads_it(tmp_path):
    """SwitchTransformers (like UDOP, UMT5 before transformers 5.24, and T5 before 5) scales its decoder output by
    d_model**-0.5 when ``tie_word_embeddings`` is set: clearing the flag after an untie changed the logits by
    √d_model = 8 (merging an lm_head adapter; ``modules_to_save=["lm_head"]`` at B = 0; a PEFT adapter with that
    head loaded off PEFT's numbers). The flag stays there and the logits stay. merge_and_unload moves the scale into
    the head and clears the flag: saved and loaded again (transformers 4 tied a flagged head back), the model
    computes the adapter's logits. GPT-2's forward does not read it (its flag is cleared: the tests above)."""
    from peft import LoraConfig, get_peft_model
    from transformers import SwitchTransformersForConditionalGeneration

    from lora_fast import load_adapter
    from lora_fast.inject import tie_reading_classes

    ids = torch.randint(0, 256, (2, 9))
    cls = "SwitchTransformersForConditionalGeneration"
    assert tie_reading_classes(_tiny_flag_reader()) == [f"{cls}.forward"]
    assert tie_reading_classes(tiny_gpt2()) == []
    # a head trained whole: nothing trained yet, nothing may change
    model = _tiny_flag_reader()
    want = _t5_logits(model, ids)
    with pytest.warns(UserWarning, match=f"tie_word_embeddings left True: {cls}.forward"):
        apply_lora(model, ["q", "v"], rank=4, modules_to_save=["lm_head"])
    assert model.lm_head.weight is not model.shared.weight and model.config.tie_word_embeddings is True
    torch.testing.assert_close(_t5_logits(model, ids), want, rtol=0, atol=0)
    # PEFT's adapter with that head: PEFT's numbers
    peft_model = get_peft_model(_tiny_flag_reader(), LoraConfig(r=4, target_modules=["q", "v"],
                                                                modules_to_save=["lm_head"],
                                                                init_lora_weights=False)).eval()
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    peft_model.save_pretrained(tmp_path / "peft")
    model = _tiny_flag_reader()
    with pytest.warns(UserWarning, match="tie_word_embeddings left True"):
        load_adapter(model, tmp_path / "peft", is_trainable=False)
    assert_rel_close(_t5_logits(model, ids), _t5_logits(peft_model, ids), 1e-6, "adapter with lm_head")
    # merge_lora keeps the layers (an adapter may be unmerged or loaded again): the flag stays, the logits stay
    model = apply_lora(_tiny_flag_reader(), ["q", "v", "lm_head"], rank=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.lora_B.normal_(0, 0.1)
    want = _t5_logits(model, ids)
    with pytest.warns(UserWarning, match="tie_word_embeddings left True"):
        merge_lora(model)
    assert model.config.tie_word_embeddings is True
    assert_rel_close(_t5_logits(model, ids), want, 1e-5, "SwitchTransformers merged in place")
    # merge_and_unload of a LoRA head, and of a head trained whole: the saved model loads with its own head and the
    # adapter's logits. transformers 4 tied a flagged head back to the embeddings (logits 33 % off): there the
    # decoder's scale moves into the head and the flag is cleared. transformers 5 keeps the flag True, and its
    # from_pretrained keeps a head that differs from the embeddings: there both stay as they are.
    folds = transformers_major() < 5
    done = rf"{cls} now hold the decoder's d_model\*\*-0.5" if folds else "left True"
    for case in ("LoRA on lm_head", "modules_to_save"):
        if case == "LoRA on lm_head":
            model = apply_lora(_tiny_flag_reader(), ["q", "v", "lm_head"], rank=4)
        else:
            with pytest.warns(UserWarning, match="tie_word_embeddings left True"):
                model = apply_lora(_tiny_flag_reader(), ["q", "v"], rank=4, modules_to_save=["lm_head"])
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora.lora_B.normal_(0, 0.1)
            model.get_output_embeddings().weight.mul_(1.5)  # a trained head (under LoRA: another base weight)
        want = _t5_logits(model, ids)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = merge_and_unload(model)
        said = " ".join(str(w.message) for w in caught)  # 5 with a head untied at apply_lora: nothing new to say
        assert (re.search(done, said) is not None) == (folds or case == "LoRA on lm_head"), said
        assert merged.config.tie_word_embeddings is not folds, case
        assert_rel_close(_t5_logits(merged, ids), want, 1e-5, f"merged SwitchTransformers, {case}")
        merged.save_pretrained(tmp_path / case)
        again = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / case).eval()
        assert again.lm_head.weight is not again.shared.weight
        assert_rel_close(_t5_logits(again, ids), want, 1e-5, f"merged SwitchTransformers after save/load, {case}")


@pytest.mark.parametrize("kind", ["T5", "UMT5"])
def test_merged_t5_family_reloads_with_the_adapters_logits(tmp_path, kind):
    """T5 and UMT5, whichever way the installed transformers scales their decoder output (the tie flag: transformers
    4, UMT5 before 5.24; ``scale_decoder_outputs``, which transformers 5 derives from the flag when loading): a merged
    LoRA head, or a head trained whole, saved and loaded again computes the adapter's logits."""
    import transformers

    ids = torch.randint(0, 256, (2, 9))
    cfg = getattr(transformers, f"{kind}Config")(num_layers=1, num_decoder_layers=1, d_model=64, d_kv=16, d_ff=96,
                                                   num_heads=4, vocab_size=256)
    cls = getattr(transformers, f"{kind}ForConditionalGeneration")
    for case in ("LoRA on lm_head", "modules_to_save"):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tie warnings: the tests above
            if case == "LoRA on lm_head":
                model = apply_lora(cls(cfg).eval(), ["q", "v", "lm_head"], rank=4)
            else:
                model = apply_lora(cls(cfg).eval(), ["q", "v"], rank=4, modules_to_save=["lm_head"])
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    layer.lora.lora_B.normal_(0, 0.1)
                model.get_output_embeddings().weight.mul_(1.5)  # a trained head
            want = _t5_logits(model, ids)
            merged = merge_and_unload(model)
            assert_rel_close(_t5_logits(merged, ids), want, 1e-5, f"merged {kind}, {case}")
            merged.save_pretrained(tmp_path / case)
            again = cls.from_pretrained(tmp_path / case).eval()
        assert_rel_close(_t5_logits(again, ids), want, 1e-5, f"merged {kind} after save/load, {case}")


def test_a_peft_model_is_pointed_to_peft_s_own_method():
    """merge_lora & co on a PeftModel (patched or not): PEFT's method by name, not 'apply_lora first'."""
    peft = pytest.importorskip("peft", reason=MISSING["peft"])
    from lora_fast import patch_peft

    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(target_modules=["c_attn"], r=2, fan_in_fan_out=True))
    for patched in (False, True):
        if patched:
            patch_peft(model)
        for fn, method in ((merge_lora, "merge_adapter"), (unmerge_lora, "unmerge_adapter"),
                           (merge_and_unload, "merge_and_unload"), (unload, "unload")):
            with pytest.raises(ValueError, match=rf"^{fn.__name__}: PeftModel holds PEFT's LoRA layers, not "
                                                 rf"lora_fast's .*model\.{method}\(\)$"):
                fn(model)
        with pytest.raises(ValueError, match=r"disable_adapter: PeftModel holds PEFT's .*model\.disable_adapter\(\)$"):
            with disable_adapter(model):
                pass
