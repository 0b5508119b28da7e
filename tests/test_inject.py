"""Model injection: PEFT's matching rules, parity with PEFT's LoRA on GPT-2, merge/unload, parameter counts."""

import copy
import re
import types
import warnings

import pytest
import torch
import torch.nn as nn
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from lora_fast import (
    LinearWithLoRA,
    apply_lora,
    apply_lora_to_gpt2,
    count_parameters,
    find_target_modules,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from lora_fast.checkpointing import checkpointing_on, enable_checkpointing
from tests.utils import MISSING, assert_rel_close

peft = pytest.importorskip("peft", reason=MISSING["peft"])

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=101)
TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _peft_pairs(ours, theirs):
    """(our LinearWithLoRA, PEFT LoRA layer) by module name."""
    pairs = []
    for name, layer in lora_layers(ours).items():
        pairs.append((name, layer, theirs.base_model.model.get_submodule(name)))
    return pairs


@pytest.mark.parametrize("make, targets", [(tiny_gpt2, TARGETS), (tiny_llama, ["q_proj", "v_proj", "down_proj"])])
def test_equal_to_peft_logits_and_lora_grads(make, targets):
    ours = apply_lora(make(), target_modules=targets, rank=4, alpha=8.0, backend="reference")
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, lora_dropout=0.0,
                          fan_in_fan_out=make is tiny_gpt2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out on Conv1D
        theirs = peft.get_peft_model(make(), cfg)
    pairs = _peft_pairs(ours, theirs)
    assert len(pairs) == 2 * (len(targets) + (make is tiny_gpt2))  # c_proj matches attn.c_proj and mlp.c_proj
    with torch.no_grad():  # same A, B values (B random so the LoRA term is not zero)
        for _, mine, their in pairs:
            mine.lora.lora_B.normal_(0, 0.1)
            their.lora_A["default"].weight.copy_(mine.lora.lora_A)
            their.lora_B["default"].weight.copy_(mine.lora.lora_B)
            assert their.scaling["default"] == mine.scaling
    ids = torch.randint(0, 101, (2, 12))
    out_ours = ours(ids, labels=ids)
    out_theirs = theirs(ids, labels=ids)
    assert_rel_close(out_ours.logits, out_theirs.logits, 1e-5, "logits")
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, mine, their in pairs:
        assert_rel_close(mine.lora.lora_A.grad, their.lora_A["default"].weight.grad, 1e-5, f"{name} dA")
        assert_rel_close(mine.lora.lora_B.grad, their.lora_B["default"].weight.grad, 1e-5, f"{name} dB")
    assert count_parameters(ours)["trainable"] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("make, targets, dtype", [
    (tiny_gpt2, "all-linear", torch.float32), (tiny_llama, "all-linear", torch.float32),
    (tiny_gpt2, ["c_attn", "c_fc"], torch.bfloat16), (tiny_llama, ["q_proj", "down_proj"], torch.float16)])
def test_one_seed_gives_peft_s_initial_adapter(make, targets, dtype):
    """A PEFT user's seeded run starts from the same adapter: after one ``torch.manual_seed`` apply_lora and
    get_peft_model draw every layer's A equal (PEFT draws nn.Linear(in, r)'s and nn.Linear(r, out)'s own inits
    before A, on the CPU in fp32; of a half base its A passes through the base's dtype), B zeros, and the generator
    is left in one state. lora_fast drew A first: another A at every layer, the runs apart from the first step."""
    ours, base = make().to(dtype), make().to(dtype)
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, fan_in_fan_out=make is tiny_gpt2)
    torch.manual_seed(1234)
    apply_lora(ours, target_modules=targets, rank=4, alpha=8.0)
    after_ours = torch.rand(3)
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out on Conv1D
        theirs = peft.get_peft_model(base, cfg)
    assert torch.equal(torch.rand(3), after_ours), "the generator is left where PEFT leaves it"
    pairs = _peft_pairs(ours, theirs)
    assert len(pairs) == len(peft_layers := [n for n, m in theirs.named_modules() if hasattr(m, "lora_A")
                                                and isinstance(m.lora_A, nn.ModuleDict)]) > 1, peft_layers
    for name, mine, their in pairs:
        assert mine.lora.lora_A.dtype == their.lora_A["default"].weight.dtype == torch.float32, name
        assert torch.equal(mine.lora.lora_A, their.lora_A["default"].weight), name
        assert torch.equal(mine.lora.lora_B, their.lora_B["default"].weight) and not mine.lora.lora_B.any(), name
    assert len({mine.lora.lora_A[0, 0].item() for _, mine, _ in pairs}) == len(pairs)  # each layer its own draw


def test_a_lora_config_builds_peft_s_adapter():
    """``apply_lora(model, config=LoraConfig(...))`` builds what ``get_peft_model(model, config)`` builds: the same
    layers (layers_to_transform, rank_pattern, alpha_pattern, rsLoRA, dropout), the same initial A after one seed,
    the same outputs and gradients, and the task's head trained whole. apply_lora had no way to take a LoraConfig
    or these fields, which load_adapter already honoured (Python-API trial). Arguments beside a config, a field
    lora_fast does not implement and a model already holding LoRA layers are refused by name."""
    base = tiny_gpt2()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], rank_pattern={"c_fc": 2},
                          alpha_pattern={"attn.c_proj": 3}, layers_to_transform=[1], fan_in_fan_out=True,
                          lora_dropout=0.1, use_rslora=True)
    torch.manual_seed(5)
    ours = apply_lora(copy.deepcopy(base), config=cfg, backend="reference")
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out on Conv1D
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    pairs = _peft_pairs(ours, theirs)
    assert [n for n, _, _ in pairs] == [f"transformer.h.1.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")]
    for name, mine, their in pairs:
        assert mine.rank == their.r["default"] == (2 if "c_fc" in name else 4), name
        assert mine.scaling == their.scaling["default"] and mine.lora.dropout == 0.1, name
        assert torch.equal(mine.lora.lora_A, their.lora_A["default"].weight), name
        with torch.no_grad():
            their.lora_B["default"].weight.copy_(mine.lora.lora_B.normal_())
    ours.eval(), theirs.eval()
    ids = torch.randint(0, 101, (2, 9))
    out, ref = ours(ids, labels=ids), theirs(ids, labels=ids)
    assert_rel_close(out.logits, ref.logits, 1e-5, "logits")
    out.loss.backward(), ref.loss.backward()
    for name, mine, their in pairs:
        assert_rel_close(mine.lora.lora_B.grad, their.lora_B["default"].weight.grad, 1e-5, f"{name} dB")
    assert count_parameters(ours)["trainable"] == theirs.get_nb_trainable_parameters()[0]

    cls = transformers.GPT2ForSequenceClassification(GPT2Config(**TINY, pad_token_id=0))
    apply_lora(cls, config={"task_type": "SEQ_CLS", "target_modules": ["c_attn"], "rank": 2})  # a dict, our names
    assert cls.score.weight.requires_grad and {m.rank for m in lora_layers(cls).values()} == {2}
    with pytest.raises(TypeError, match="rank, modules_to_save given beside it would be ignored"):
        apply_lora(tiny_gpt2(), rank=4, modules_to_save=["lm_head"], config=cfg)
    with pytest.raises(ValueError, match=r"apply_lora: the config uses \{'use_dora': True\}.*get_peft_model"):
        apply_lora(tiny_gpt2(), config=peft.LoraConfig(target_modules=["c_attn"], use_dora=True))
    with pytest.raises(ValueError, match="apply_lora: the model already has LoRA layers"):
        apply_lora(ours, config=cfg)
    with pytest.raises(ValueError, match=r"apply_lora: the config's target_modules \['q_proj'\] match no module"):
        apply_lora(tiny_gpt2(), config=peft.LoraConfig(target_modules=["q_proj"]))
    model = tiny_gpt2()  # a refusal at the second layer: before the first is wrapped
    proj = model.transformer.h[1].attn.c_attn  # a quantised base
    proj.weight = nn.Parameter(proj.weight.detach().to(torch.int8), requires_grad=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"apply_lora: transformer.h.1.attn.c_attn: .*quantised bases"):
        apply_lora(model, config={"target_modules": ["c_attn"]})
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters() if p.is_floating_point())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # fields that only matter when building, which lora_fast does not implement: refused (they gave PEFT's
    # default init, or untied what PEFT keeps tied, without a word)
    for field in ({"init_lora_weights": False}, {"init_lora_weights": "gaussian"}, {"ensure_weight_tying": True}):
        with pytest.raises(ValueError, match=rf"apply_lora: the config sets {re.escape(repr(field))}.*get_peft_model"):
            apply_lora(tiny_gpt2(), config=peft.LoraConfig(target_modules=["c_attn"], **field))
    frozen = apply_lora(tiny_gpt2(), config=peft.LoraConfig(target_modules=["c_attn"], inference_mode=True))
    assert lora_layers(frozen) and not any(p.requires_grad for p in frozen.parameters())  # as get_peft_model


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_a_config_s_all_linear_takes_the_classification_head_as_peft_does(task_type):
    """PEFT's "all-linear" leaves a classifier's head out only with task_type SEQ_CLS (which trains it whole);
    without a task type it adapts the head too. lora_fast left it out always: another adapter than PEFT's."""
    base = transformers.GPT2ForSequenceClassification(GPT2Config(**TINY, pad_token_id=0, num_labels=3))
    cfg = peft.LoraConfig(r=2, target_modules="all-linear", task_type=task_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without SEQ_CLS, both say the head is adapted, not trained whole
        ours = apply_lora(copy.deepcopy(base), config=cfg)
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    assert sorted(lora_layers(ours)) == sorted(n for n, _, _ in _peft_pairs(ours, theirs))
    theirs_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict))
    assert sorted(lora_layers(ours)) == theirs_wrapped
    assert ("score" in lora_layers(ours)) is (task_type is None)
    assert ours.score.weight.requires_grad is (task_type == "SEQ_CLS")


def test_parameter_counts_equal_peft_on_gpt2_small():
    base = GPT2LMHeadModel(GPT2Config())  # GPT-2 124M architecture, random init
    c_attn = count_parameters(apply_lora(base, ["c_attn"], rank=8))
    theirs = peft.get_peft_model(GPT2LMHeadModel(GPT2Config()), peft.LoraConfig(r=8, target_modules=["c_attn"],
                                                                                 fan_in_fan_out=True))
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (c_attn["trainable"], c_attn["total"]) == (trainable, total)
    assert c_attn["trainable"] == 294_912  # 12 layers x 8 x (768 + 2304), as PEFT prints for this config
    assert c_attn["frozen"] == total - trainable
    assert c_attn["percentage"] == pytest.approx(100 * trainable / total)
    three = count_parameters(apply_lora(GPT2LMHeadModel(GPT2Config()), TARGETS, rank=8))
    assert three["trainable"] == 1_179_648


def test_matching_rules():
    model = tiny_gpt2()
    names = find_target_modules(model, ["attn.c_proj"])  # suffix after a dot
    assert names == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert find_target_modules(model, ["transformer.h.1.mlp.c_fc"]) == ["transformer.h.1.mlp.c_fc"]
    with pytest.raises(ValueError, match="matched no module"):
        find_target_modules(model, ["proj"])  # "c_proj" does not end with ".proj"
    regex = find_target_modules(model, r".*\.1\.(attn\.c_attn|mlp\.c_fc)")
    assert regex == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    with pytest.raises(ValueError, match="matched no module"):
        find_target_modules(model, "c_attn")  # a string is a full-match regex, not a suffix
    all_linear = find_target_modules(model, "all-linear")
    assert "lm_head" not in all_linear and len(all_linear) == 8
    assert find_target_modules(model, None) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_no_match_error_names_targets_and_candidates():
    with pytest.raises(ValueError) as e:
        apply_lora(tiny_gpt2(), target_modules=["q_proj", "v_proj"])
    msg = str(e.value)
    assert "q_proj" in msg and "v_proj" in msg and "c_attn" in msg and "c_fc" in msg


def test_unsupported_module_and_unknown_architecture():
    with pytest.raises(ValueError, match=r"GPT2(Sdpa)?Attention"):  # 4.4x: GPT2SdpaAttention
        apply_lora(tiny_gpt2(), target_modules=["attn"])
    with pytest.raises(ValueError, match="no default target_modules"):
        apply_lora(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(tiny_gpt2(), rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(tiny_gpt2(), target_modules=[])


def test_bad_regex_dead_entries_and_merged_layers_are_reported():
    """An invalid regex is a ValueError naming target_modules (not a bare re.error); a list entry matching nothing
    next to ones that match is warned about (PEFT drops it silently); re-applying over a merged layer, whose LoRA
    weights would train without effect, is refused before the model changes."""
    with pytest.raises(ValueError, match=r"target_modules 'c_attn\[' is not a valid regular expression"):
        apply_lora(tiny_gpt2(), target_modules="c_attn[")
    with pytest.warns(UserWarning, match=r"target_modules \['c_prj'\] matched no module"):
        model = apply_lora(tiny_gpt2(), target_modules=["c_attn", "c_prj"])
    assert len(lora_layers(model)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry matching: no warning
        apply_lora(tiny_gpt2(), target_modules=["c_attn", "mlp.c_proj"])
    merge_lora(model)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn is merged"):
        apply_lora(model, ["c_attn"], rank=8)
    assert all(layer.merged for layer in lora_layers(model).values())
    unmerge_lora(model)
    apply_lora(model, ["c_attn"], rank=8)


def test_freezes_everything_but_lora_and_never_nests():
    model = apply_lora(tiny_gpt2(), TARGETS, rank=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora.lora_A", ".lora.lora_B")) for n in trainable)
    n_layers = len(lora_layers(model))
    apply_lora(model, TARGETS, rank=2)
    apply_lora(model, r".*c_(attn|proj|fc).*", rank=2)  # would also match the wrapped bases' inner names
    with pytest.warns(UserWarning, match="already has a LoRA adapter"):
        apply_lora(model, ["c_attn"], rank=16)  # a different config never silently looks applied
    assert all(m.rank == 2 for m in lora_layers(model).values())
    assert len(lora_layers(model)) == n_layers == 8
    for layer in lora_layers(model).values():
        assert not isinstance(layer.linear, LinearWithLoRA)


def test_injected_layers_train_as_pefts_do_whatever_the_model_mode():
    """PEFT's get_peft_model leaves its new LoRA layers in training mode on a model from_pretrained returned in eval
    mode: a loop that never calls model.train() trains with LoRA dropout. The layers followed the model's mode,
    so the same loop trained without it. model.eval() / model.train() set them as usual."""
    peft = pytest.importorskip("peft", reason=MISSING["peft"])
    base = tiny_gpt2()
    assert not base.training  # as from_pretrained returns it
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.5))
    peft_modes = {n.removeprefix("base_model.model."): m.training for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    model = apply_lora(base, TARGETS, rank=2, dropout=0.5)
    assert {n: m.training for n, m in lora_layers(model).items()} == peft_modes and all(peft_modes.values())
    assert all(m.lora.lora_dropout.training for m in lora_layers(model).values())
    assert not model.transformer.drop.training  # the model's own dropout stays as it was, as under PEFT
    model.eval()
    ids = torch.randint(0, 101, (1, 8))
    assert torch.equal(model(ids).logits, model(ids).logits)  # no dropout in eval
    model.train()
    assert all(m.lora.training for m in lora_layers(model).values())


def test_default_targets_are_the_wrapped_models_own():
    """target_modules=None reads the model_type of the model inside DataParallel / DDP / compile wrappers (a
    DataParallel-wrapped GPT-2 raised "no default target_modules for model_type=None")."""
    plain = find_target_modules(tiny_gpt2(), None)
    assert plain and find_target_modules(nn.DataParallel(tiny_gpt2()), None) == [f"module.{n}" for n in plain]


def test_apply_lora_to_gpt2_default_is_c_attn():
    model = apply_lora_to_gpt2(tiny_gpt2(), rank=4, alpha=8.0)
    assert sorted(lora_layers(model)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(m.rank == 4 and m.scaling == 2.0 for m in lora_layers(model).values())


def test_merge_unmerge_and_unload():
    model = apply_lora(tiny_gpt2(), TARGETS, rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 101, (2, 10))
    ref = model(ids).logits
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    assert_rel_close(model(ids).logits, ref, 1e-5, "merged")
    unmerge_lora(model)
    assert_rel_close(model(ids).logits, ref, 1e-5, "unmerged")
    plain = merge_and_unload(model)
    assert not lora_layers(plain)
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)
    assert_rel_close(plain(ids).logits, ref, 1e-5, "merge_and_unload")
    assert not hasattr(plain, "lora_fast_config")


def test_merge_and_unload_of_a_single_layer_returns_the_merged_base():
    """A LinearWithLoRA given itself (the root) comes back as its plain merged base, computing the same function;
    nothing is registered under an empty name."""
    layer = LinearWithLoRA(nn.Linear(6, 4), rank=2)
    nn.init.normal_(layer.lora.lora_B)
    x = torch.randn(3, 6)
    ref = layer(x)
    plain = merge_and_unload(layer)
    assert type(plain) is nn.Linear and sorted(plain.state_dict()) == ["bias", "weight"]
    assert_rel_close(plain(x), ref.double(), 1e-6, "merged root")


def test_llama_linear_default_targets():
    model = apply_lora(tiny_llama(), rank=2)
    assert sorted(n.rsplit(".", 1)[-1] for n in lora_layers(model)) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert all(not m.fan_in_fan_out for m in lora_layers(model).values())
    plain = merge_and_unload(model)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)


def test_all_linear_leaves_out_classification_heads_as_peft():
    from transformers import BertConfig, BertForSequenceClassification, GPT2ForSequenceClassification

    torch.manual_seed(0)
    gpt = GPT2ForSequenceClassification(GPT2Config(**TINY, num_labels=3, pad_token_id=0))
    names = find_target_modules(gpt, "ALL-LINEAR")  # the shorthand is case-insensitive, as in PEFT
    assert "score" not in names and len(names) == 8
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=101, num_labels=2))
    ours = set(find_target_modules(bert, "all-linear"))
    theirs = peft.get_peft_model(bert, peft.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert "classifier" not in ours and ours == peft_names


def test_unsupported_bases_are_refused_before_the_model_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(model[1].weight.detach().to(torch.int8), requires_grad=False)  # quantised-like
    with pytest.raises(TypeError, match=r"apply_lora: 1: .*int8"):  # names which target it is
        apply_lora(model, target_modules=["0", "1"])
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], LinearWithLoRA)  # untouched
    with pytest.raises(ValueError, match="meta"):
        LinearWithLoRA(nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        apply_lora(tiny_gpt2(), rank=2, backend="trtion")


def test_tied_output_embedding_warns():
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match="tied to"):
        apply_lora(model, ["lm_head"], rank=2)


def test_multihead_attention_out_proj_is_never_silently_inert():
    """nn.MultiheadAttention uses out_proj.weight directly (never calling out_proj): such a module is left out
    with a warning when a suffix or regex also matches other modules (as PEFT configs targeting q/k/v/out_proj do),
    and is an error when it is all that matches or is named in full; "all-linear" leaves it out."""
    def model():
        return nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))

    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        apply_lora(model(), ["out_proj"])  # nothing else matches
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        apply_lora(model(), ["0.self_attn.out_proj", "linear1"])  # named in full
    with pytest.warns(UserWarning, match=r"left out '0.self_attn.out_proj'"):
        m = apply_lora(model(), ["out_proj", "linear1"])
    assert {n for n, x in m.named_modules() if isinstance(x, LinearWithLoRA)} == {"0.linear1"}
    m = apply_lora(model(), "all-linear", rank=2)
    assert {n for n, x in m.named_modules() if isinstance(x, LinearWithLoRA)} == {"0.linear1", "0.linear2"}


def test_peft_wrapped_model_is_refused():
    """apply_lora on a model PEFT has already wrapped would nest adapters (all-linear wrapped PEFT's own lora_A and
    base_layer): an error that names the ways forward — also once patch_peft has patched its layers."""
    peft = pytest.importorskip("peft", reason=MISSING["peft"])
    from lora_fast.peft_compat import patch_peft

    pm = peft.get_peft_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)),
                             peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    for patched in (False, True):  # patch_peft swaps in a lora_fast subclass of PEFT's layer: still PEFT's layers
        if patched:
            patch_peft(pm)
        for targets in ("all-linear", ["c_attn"], r".*attn\..*"):
            with pytest.raises(ValueError, match="already holds PEFT LoRA layers.*patch_peft"):
                apply_lora(pm, targets)
        with pytest.raises(ValueError, match="c_attn' is a .*Linear.*a PEFT layer left in the model"):
            apply_lora(pm, config=peft.LoraConfig(target_modules=["c_attn"]))
        assert not lora_layers(pm)


# ------------------------------------------------------------------------------------------ modules_to_save
def tiny_gpt2_cls(seed=0):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(**TINY, num_labels=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(cfg).eval()


def test_modules_to_save_trains_the_head_like_peft(tmp_path):
    """apply_lora(modules_to_save=["score"]) trains the head whole: the same trainable set as PEFT's LoraConfig with
    that field, and save_adapter's file loads in PEFT with the trained head (equal logits)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from lora_fast import save_adapter

    ours = apply_lora(tiny_gpt2_cls(), ["c_attn"], rank=4, alpha=8, modules_to_save=["score"])
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == ["score.weight"] + [f"transformer.h.{i}.attn.c_attn.lora.lora_{x}" for i in range(2)
                                            for x in "AB"]
    theirs = get_peft_model(tiny_gpt2_cls(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                        modules_to_save=["score"], fan_in_fan_out=True))
    assert count_parameters(ours)["trainable"] == count_parameters(theirs)["trainable"]
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # "trained": B and the head away from their initial values
    ids = torch.randint(1, 101, (2, 9))
    save_adapter(ours, tmp_path / "a", task_type="SEQ_CLS")
    loaded = PeftModel.from_pretrained(tiny_gpt2_cls(), tmp_path / "a").eval()
    assert_rel_close(loaded(ids).logits, ours(ids).logits, 1e-5, "PEFT-loaded logits")
    assert not torch.equal(tiny_gpt2_cls()(ids).logits, ours(ids).logits)


def test_modules_to_save_unties_a_tied_head():
    """A tied lm_head in modules_to_save gets its own weight (as PEFT trains a copy): a step on it leaves the input
    embeddings as they were."""
    model = tiny_gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="lm_head.weight .was tied to transformer.wte.weight"):
        apply_lora(model, ["c_attn"], modules_to_save=["lm_head"])
    assert model.lm_head.weight.requires_grad and not model.transformer.wte.weight.requires_grad
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.train()
    model(torch.randint(0, 101, (2, 8)), labels=torch.randint(0, 101, (2, 8))).loss.backward()
    with torch.no_grad():
        model.lm_head.weight.sub_(model.lm_head.weight.grad)
    assert torch.equal(model.transformer.wte.weight, wte)
    assert not torch.equal(model.lm_head.weight, wte)


def test_a_modules_to_save_entry_matching_nothing_beside_others_is_a_warning():
    """PEFT's SEQ_CLS list ["classifier", "score"] names the head of either family: on BERT "score" matches
    nothing. As with target_modules, that is a warning naming it (a typo beside a good entry is not silent); the
    entries that match are trained whole."""
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match=r"modules_to_save \['scroe'\] matched no module of GPT2LMHeadModel \(the "
                      r"other entries matched \['lm_head'\]"):
        apply_lora(model, ["c_attn"], modules_to_save=["lm_head", "scroe"])
    assert model.lm_head.weight.requires_grad and len(lora_layers(model)) == 2


def test_modules_to_save_errors_leave_the_model_alone():
    model = tiny_gpt2()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"modules_to_save \['scroe'\] matched no module"):
        apply_lora(model, ["c_attn"], modules_to_save=["scroe"])
    with pytest.raises(ValueError, match="cannot also hold a LoRA adapter"):
        apply_lora(model, ["transformer.h.0.attn.c_attn"], modules_to_save=["h.0.attn"])  # holds a target named in full
    with pytest.raises(ValueError, match=r"every match lies inside modules_to_save \(2 module"):
        apply_lora(model, ["c_attn"], modules_to_save=["c_attn"])
    with pytest.raises(TypeError, match="modules_to_save must be a list of module names"):
        apply_lora(model, ["c_attn"], modules_to_save=[3])
    assert not lora_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.lm_head.weight is model.transformer.wte.weight
    # a single name is one entry, not its characters; entries nested in another selected module are fine
    apply_lora(model, ["c_attn"], modules_to_save="ln_f")
    assert model.transformer.ln_f.weight.requires_grad


def test_a_task_head_left_frozen_is_warned_about():
    """PEFT's task_type trains a classification head whole; apply_lora without modules_to_save leaves it at its
    (random) initial weights: a warning names the head and the fix. Nothing to say once it is trained."""
    with pytest.warns(UserWarning, match=r"head 'score' stays frozen.*modules_to_save=\['score'\].*SEQ_CLS"):
        apply_lora(tiny_gpt2_cls(), ["c_attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(tiny_gpt2_cls(), ["c_attn"], modules_to_save=["score"])
        apply_lora(tiny_gpt2(), ["c_attn"])  # no task head


def test_numpy_hyper_parameters_are_plain_numbers(tmp_path):
    """A sweep's np.int64 rank / np.float32 alpha are accepted as PEFT accepts them, and stored as Python numbers
    (the adapter config is JSON); np.bool_ and float ranks are still refused."""
    import json

    import numpy as np

    from lora_fast import save_adapter

    model = apply_lora(tiny_gpt2(), ["c_attn"], rank=np.int64(4), alpha=np.float32(8), dropout=np.float64(0.1))
    layer = next(iter(lora_layers(model).values()))
    assert type(layer.rank) is int and layer.lora.alpha == 8.0 and layer.scaling == 2.0
    cfg = json.loads((save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.1)
    for bad in (np.bool_(True), np.float64(4.0)):
        with pytest.raises(ValueError, match="rank must be a positive int"):
            LinearWithLoRA(nn.Linear(8, 8), rank=bad)


def test_a_name_given_as_a_string_gets_the_list_hint():
    """PEFT's rule: a string is a full-match regex, so "c_attn" matches nothing on GPT-2; the error says why and
    what to pass, rather than listing 'c_attn' among the candidates without comment."""
    with pytest.raises(ValueError, match=r"regular expression matched against the full module name.*\['c_attn'\]"):
        apply_lora(tiny_gpt2(), "c_attn")
    with pytest.raises(ValueError, match=r"matched no module") as e:
        apply_lora(tiny_gpt2(), "nothing_like_it")
    assert "regular expression" not in str(e.value)


def test_default_targets_cover_peft_table():
    """target_modules=None knows every architecture PEFT's default table knows, with the same modules (an
    XLM-RoBERTa model used to get 'no default target_modules')."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from lora_fast.inject import DEFAULT_TARGET_MODULES

    for model_type, targets in peft_defaults.items():
        assert DEFAULT_TARGET_MODULES.get(model_type) == targets, model_type
    cfg = XLMRobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                           vocab_size=64)
    model = apply_lora(XLMRobertaModel(cfg), rank=2)
    assert set(lora_layers(model)) == {"encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"}


def test_modules_to_save_survive_a_second_call_and_a_frozen_load(tmp_path):
    """modules_to_save belong to the adapter: a second apply_lora without them keeps them trainable, a clash with a
    LoRA layer of an earlier call is refused before anything changes, and an adapter loaded frozen
    (is_trainable=False) and saved again still carries them (save used to decide from requires_grad alone)."""
    import json

    from safetensors.torch import load_file

    from lora_fast import load_adapter, save_adapter

    model = apply_lora(tiny_gpt2(), ["c_attn"], modules_to_save=["ln_f"])
    apply_lora(model, ["c_fc"])
    assert model.transformer.ln_f.weight.requires_grad
    with pytest.raises(ValueError, match="cannot also hold a LoRA adapter"):
        apply_lora(model, ["c_proj"], modules_to_save=["h.0.attn"])  # holds the earlier call's c_attn
    assert not model.transformer.h[0].attn.c_attn.linear.weight.requires_grad
    assert not any(n.endswith("c_proj") for n in lora_layers(model))
    save_adapter(model, tmp_path / "a")
    fresh = tiny_gpt2()
    load_adapter(fresh, tmp_path / "a", is_trainable=False)
    assert not any(p.requires_grad for p in fresh.parameters())
    save_adapter(fresh, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["transformer.ln_f"]
    assert "base_model.model.transformer.ln_f.weight" in load_file(tmp_path / "b" / "adapter_model.safetensors")


def test_targets_inside_modules_to_save_are_left_out_as_peft_does(tmp_path):
    """RoBERTa's classification head holds its own ``dense`` and ``out_proj``: with targets ["query", "value",
    "dense"] and modules_to_save=["classifier"] (what the frozen-head warning advises), PEFT leaves classifier.dense
    out of the targets and trains the head whole. apply_lora raised a clash there; it now picks PEFT's modules (with
    a warning), and the saved adapter loads in PEFT with equal logits. Without modules_to_save, LoRA inside the head
    is named at once (save_adapter would refuse it), not only when saving."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from lora_fast import save_adapter

    def roberta():
        torch.manual_seed(0)
        return RobertaForSequenceClassification(RobertaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=40, pad_token_id=1, num_labels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)).eval()

    targets = ["query", "value", "dense"]
    theirs = get_peft_model(roberta(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  modules_to_save=["classifier"]))
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    with pytest.warns(UserWarning, match=r"left out 1 module\(s\) .*inside modules_to_save \['classifier'\].*: "
                                         r"classifier.dense \(as PEFT does\)"):
        ours = apply_lora(roberta(), targets, rank=4, alpha=8, modules_to_save=["classifier"])
    assert set(lora_layers(ours)) == peft_names and len(peft_names) == 10
    assert count_parameters(ours)["trainable"] == count_parameters(theirs)["trainable"]
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(ours, tmp_path / "a", task_type="SEQ_CLS")
    ids = torch.randint(2, 64, (2, 7))
    loaded = PeftModel.from_pretrained(roberta(), tmp_path / "a").eval()
    assert_rel_close(loaded(ids).logits, ours(ids).logits, 1e-5, "PEFT-loaded logits")
    with pytest.warns(UserWarning, match=r"\['classifier.dense'\] sit in .*head 'classifier'.*save_adapter will "
                                         r"refuse.*modules_to_save=\['classifier'\]"):
        apply_lora(roberta(), targets, rank=4, alpha=8)


def test_all_linear_of_a_compiled_classifier_leaves_its_head_out():
    """The head check looked at the wrapper's class (OptimizedModule), so "all-linear" of a torch.compile'd
    *ForSequenceClassification wrapped its score head too; the model inside decides now."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg)
    plain = find_target_modules(model, "all-linear")
    compiled = find_target_modules(torch.compile(model), "all-linear")
    assert "score" not in plain and len(plain) == 7
    assert compiled == [f"_orig_mod.{n}" for n in plain]


@pytest.mark.parametrize("order", ["checkpointing first", "adapter first"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_a_vision_model_keeps_every_lora_gradient(reentrant, order):
    """A model whose input is not input_ids (ViT): with reentrant checkpointing on and the base frozen, no input of
    a checkpointed block required grad, so every LoRA weight got no gradient (PEFT's get_peft_model makes the
    embeddings' output require grad; apply_lora does the same). The Trainer switches checkpointing on after the
    adapter is in place — there PEFT and transformers (which helps input_ids models only) leave the gap and only
    the head trained; apply_lora's hook closes it. Gradients equal those without checkpointing, also in a deep copy
    made before checkpointing is switched on (the hook acts on the model it runs for)."""
    import copy

    from transformers import ViTConfig, ViTForImageClassification

    def vit():
        torch.manual_seed(0)
        return ViTForImageClassification(ViTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    def lora_grads(model):
        model.train()
        model(pixel_values=x, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if ".lora.lora_" in n}

    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    grads = []
    for checkpointing in (False, True):
        model = vit()
        if checkpointing and order == "checkpointing first":
            enable_checkpointing(model, reentrant)
        names = {n.rsplit(".", 1)[-1] for n in dict(model.named_modules())}  # q_proj/v_proj in later 5.x
        targets = ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]
        apply_lora(model, targets, rank=4, alpha=8, modules_to_save=["classifier"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()  # B = 0 at init: A's gradient would be zero either way
        twin = copy.deepcopy(model)
        if checkpointing and order == "adapter first":
            enable_checkpointing(model, reentrant)
            enable_checkpointing(twin, reentrant)
        grads.append(lora_grads(model))
        if checkpointing:
            grads.append(lora_grads(twin))
    assert len(grads[0]) == 8
    for g_ckpt in grads[1:]:
        for n, g in grads[0].items():
            assert g_ckpt[n] is not None, n
            assert_rel_close(g_ckpt[n], g.double(), 1e-5, n)


def _towers():
    from transformers import (
        BertConfig,
        CLIPConfig,
        CLIPModel,
        SpeechEncoderDecoderConfig,
        SpeechEncoderDecoderModel,
        SwinConfig,
        SwinForImageClassification,
        Wav2Vec2Config,
        Wav2Vec2ForCTC,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(0)
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=60, num_mel_bins=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2))
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8))
    wav2vec2 = Wav2Vec2ForCTC(Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(8, 8),
        conv_kernel=(3, 3), conv_stride=(2, 2), num_feat_extract_layers=2, vocab_size=12, num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, layerdrop=0.0, mask_time_prob=0.0))  # both drawn with numpy's RNG
    speech = SpeechEncoderDecoderModel(config=SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        wav2vec2.config, BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16, is_decoder=True,
                                    add_cross_attention=True), decoder_start_token_id=1, pad_token_id=0))
    speech.freeze_feature_encoder()  # the usual speech recipe
    swin = SwinForImageClassification(SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1],
                                                 num_heads=[2, 2], window_size=2, num_labels=3))
    return {"wav2vec2": (wav2vec2, {"input_values": torch.randn(2, 400), "labels": torch.randint(1, 12, (2, 4))}),
            "speech-encoder-decoder": (speech, {"input_values": torch.randn(2, 400),
                                                "labels": torch.randint(3, 60, (2, 4))}),
            "swin": (swin, {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 2])}),
            "whisper": (whisper, {"input_features": torch.randn(2, 8, 16), "labels": torch.randint(3, 60, (2, 5))}),
            "clip": (clip, {"input_ids": torch.randint(0, 60, (2, 5)), "pixel_values": torch.randn(2, 3, 16, 16),
                            "return_loss": True}),
            "custom-wrapper": (_BackboneWithHead(), {"input_ids": torch.randint(0, 60, (2, 5))})}


class _BackboneWithHead(nn.Module):
    """A user's module, not a PreTrainedModel: a frozen GPT-2 conditioning encoder first (no adapter: its c_attn is
    no query/value target), then the BERT backbone that gets the adapter, its own head and loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cond = transformers.GPT2Model(GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        self.backbone, self.head = transformers.BertModel(cfg), nn.Linear(32, 3)

    def forward(self, input_ids):
        c = self.cond(input_ids=input_ids).last_hidden_state
        return types.SimpleNamespace(loss=self.head(self.backbone(input_ids=input_ids).last_hidden_state + c)
                                     .square().mean())

    def disable_input_require_grads(self):
        self.backbone.disable_input_require_grads()


@pytest.mark.parametrize("arch", ["whisper", "clip", "wav2vec2", "speech-encoder-decoder", "swin", "custom-wrapper"])
def test_reentrant_checkpointing_after_the_adapter_trains_every_tower(arch):
    """Models of several transformers models (Whisper's encoder and decoder, CLIP's text and vision towers): the
    hook makes the input embeddings of each require grad, so every block's LoRA weights get a gradient (transformers
    4's enable_input_require_grads looked at the top model only: CLIP raised NotImplementedError at every forward,
    Whisper's encoder trained nothing). Wav2Vec2 has no input embeddings: the hidden states entering its
    checkpointed encoder are made to require grad instead (4: it raised too), also as the encoder of a
    SpeechEncoderDecoderModel whose BERT decoder has embeddings (its encoder got nothing). Swin's patch embeddings
    return a tuple. Gradients equal those without checkpointing. With lora_fast's hook the model still pickles
    after a checkpointed step (transformers' own hook is a local function), and disable_input_require_grads()
    removes all of them."""
    import copy
    import io

    from lora_fast.checkpointing import _hidden_states_require_grad, _outputs_require_grad

    model, inputs = _towers()[arch]
    names = {n.rsplit(".", 1)[-1] for n in dict(model.named_modules())}
    apply_lora(model, sorted(names & {"q_proj", "v_proj", "query", "value"}), rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    plain = copy.deepcopy(model).train()
    torch.manual_seed(1)  # the same masks, if any dropout is left on (checkpointing replays them)
    plain(**inputs).loss.backward()
    enable_checkpointing(model.backbone if arch == "custom-wrapper" else model, use_reentrant=True)
    model.train()
    torch.manual_seed(1)
    model(**inputs).loss.backward()
    want = {n: p.grad for n, p in plain.named_parameters() if ".lora.lora_" in n}
    lora = {n: p.grad for n, p in model.named_parameters() if ".lora.lora_" in n}
    missing = sorted(n for n, g in lora.items() if g is None)
    assert len(lora) == 2 * len(lora_layers(model)) >= 8 and not missing, missing
    for n, g in lora.items():
        assert_rel_close(g, want[n].double(), 1e-5, n)
    assert sum(g.abs().sum() > 0 for g in lora.values()) >= len(lora) // 2  # not a vacuous match of zeros
    if arch == "whisper":  # lora_fast's hook (CLIP: transformers 5's own, local; Wav2Vec2: parametrized)
        torch.save(model, io.BytesIO())
    ours = (_outputs_require_grad, _hidden_states_require_grad)
    if arch == "custom-wrapper":  # the frozen encoder beside the backbone: left alone (its graph is not kept)
        assert not [h for m in model.cond.modules() for h in (*m._forward_hooks.values(),
                                                              *m._forward_pre_hooks.values()) if h in ours]
    model.disable_input_require_grads()  # removes every hook lora_fast added (transformers 4: only one before)
    assert not [m for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
                if h in ours]


def test_non_reentrant_checkpointing_gets_no_embeddings_hook():
    """use_reentrant=False needs no input that requires grad: the embeddings' output is left alone (it would cost a
    backward through the first block's input), on a ViT, for which transformers adds nothing itself; gradients
    still reach every LoRA weight. enable_checkpointing takes a wrapped (compiled) model."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=16, patch_size=8, num_labels=3))
    apply_lora(model, "all-linear", rank=2)
    enable_checkpointing(torch.compile(model), use_reentrant=False)
    assert checkpointing_on(model)
    model.train()
    model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2])).loss.backward()
    assert "_require_grads_hook" not in model.__dict__ and "_require_grads_hooks" not in model.__dict__
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_the_checkpointing_hook_adds_no_graph_break():
    """The hook runs in every training forward: under torch.compile(fullgraph=True) it must trace (its module
    lookup raises nothing; the model's __dict__, which holds transformers' hook handle, is not read whole), and
    after checkpointing is switched on it acts once, eagerly, in a compiled run too."""
    from lora_fast.checkpointing import _input_grads_when_checkpointing

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = apply_lora(GPT2LMHeadModel(cfg), ["c_attn"], rank=2, backend="reference").train()
    ids = torch.randint(0, 50, (1, 5))
    torch._dynamo.reset()
    assert_rel_close(torch.compile(model, backend="eager", fullgraph=True)(ids).logits, model(ids).logits, 1e-6,
                     "logits")
    torch._dynamo.reset()
    enable_checkpointing(model, use_reentrant=True)
    model(ids)  # handled (by transformers 5 itself for input_ids models): from here the hook must trace whole
    assert "_require_grads_hook" in model.__dict__
    torch.compile(_input_grads_when_checkpointing, backend="eager", fullgraph=True)(model, (ids,))
    torch._dynamo.reset()
    model.__dict__.pop("_require_grads_hook", None)  # as transformers 4, which adds none for input_ids models
    model.__dict__.pop("_lora_fast_input_grads_added", None)
    for h in model.__dict__.pop("_require_grads_hooks", []):
        h.remove()
    torch.compile(model, backend="eager")(ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_non_reentrant_checkpointing_compiles_fullgraph_as_the_readme_says():
    """The README's recipe for ``torch.compile(fullgraph=True)`` with checkpointing: ``use_reentrant=False`` and
    transformers' input-grad hook removed (its ``requires_grad_`` inside the graph is what AOTAutograd refuses, on
    any frozen-embedding model). Every LoRA gradient then equals the eager run's without checkpointing."""
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 50, (2, 8))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = apply_lora(GPT2LMHeadModel(cfg), ["c_attn"], rank=2, backend="reference").train()
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora.lora_B)  # B ≠ 0: lora_A gets a gradient too
        run = model
        if checkpointed:
            enable_checkpointing(model, use_reentrant=False)
            if model.__dict__.get("_require_grads_hook") is not None:  # transformers 5 adds it for input_ids models
                model.disable_input_require_grads()
            torch._dynamo.reset()
            run = torch.compile(model, backend="aot_eager", fullgraph=True)
        try:
            run(ids).logits.pow(2).mean().backward()  # labels=: transformers logs inside (its own graph break)
        finally:
            torch._dynamo.reset()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 4 and grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert g.abs().sum() > 0
        assert_rel_close(grads[1][n], g.double(), 1e-5, n)


def test_the_checkpointing_hook_stays_out_of_the_way():
    """Without checkpointing the input embeddings' output is left alone (it would cost a backward through the
    first block); the user's disable_input_require_grads() is not undone; a copy whose switch holder was replaced
    still finds the switch by scanning."""
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = apply_lora(GPT2LMHeadModel(cfg), ["c_attn"], rank=2).train()
    ids = torch.randint(0, 50, (1, 5))
    model(ids)
    assert "_require_grads_hook" not in model.__dict__

    enable_checkpointing(model, use_reentrant=True)
    model(ids)
    assert "_require_grads_hook" in model.__dict__
    model.disable_input_require_grads()
    seen = []
    model.transformer.wte.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        model(ids)
    assert seen == [False]

    other = apply_lora(GPT2LMHeadModel(cfg), ["c_attn"], rank=2)
    assert other.__dict__["_lora_fast_checkpointing_probe"] == "transformer"
    other.__dict__["_lora_fast_checkpointing_probe"] = "gone"  # as after the user restructured the model
    assert not checkpointing_on(other)
    enable_checkpointing(other, use_reentrant=True)
    assert checkpointing_on(other)


def test_load_adapter_names_inert_multihead_attention_targets(tmp_path):
    """An adapter file may target the out_proj of an nn.MultiheadAttention (PEFT wraps it): those weights never
    take part (the attention reads out_proj.weight itself). apply_lora refuses such a target; load_adapter now says
    so instead of loading dead weights silently."""
    from peft import LoraConfig, get_peft_model

    from lora_fast import load_adapter

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))

    get_peft_model(model(), LoraConfig(r=2, target_modules=["out_proj", "linear1"])).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"adapts 0.self_attn.out_proj, the out_proj of nn.MultiheadAttention"):
        load_adapter(model(), tmp_path)


def test_all_linear_and_a_tuple_of_modules_to_save_leave_out_what_peft_does():
    """"all-linear" with modules_to_save=("classifier", "pooler") on BERT: PEFT leaves pooler.dense out of the targets
    (trained whole), as for a list of names; the rule used to apply to lists and regexes only, and
    find_target_modules read a tuple or set of modules_to_save as none."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    def bert():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=48, vocab_size=101, num_labels=2))

    saved = ("classifier", "pooler")
    theirs = get_peft_model(bert(), LoraConfig(r=2, target_modules="all-linear", modules_to_save=list(saved)))
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert "bert.pooler.dense" not in peft_names
    for given in (saved, set(saved), list(saved)):
        with pytest.warns(UserWarning, match="bert.pooler.dense"):
            assert set(find_target_modules(bert(), "all-linear", given)) == peft_names
    with pytest.warns(UserWarning, match=r"left out 1 module.*bert.pooler.dense \(as PEFT does\)"):
        ours = apply_lora(bert(), "all-linear", rank=2, modules_to_save=saved)
    assert set(lora_layers(ours)) == peft_names


def test_target_modules_given_as_an_iterator_are_recorded():
    """An iterator (or generator, ``map``) of names is read once: the matching used to consume it, so the model's
    ``lora_fast_config`` recorded ``[]`` and a .bin written from it (the tutorials' format) failed to load."""
    from lora_fast import apply_lora, lora_layers

    model = tiny_gpt2()
    apply_lora(model, iter(["c_attn", "c_fc"]), rank=2)
    assert model.lora_fast_config["target_modules"] == ["c_attn", "c_fc"]
    assert len(lora_layers(model)) == 4
    model = tiny_gpt2()
    apply_lora(model, (n for n in ["c_proj"]), rank=2)
    assert model.lora_fast_config["target_modules"] == ["c_proj"]


def test_resizing_the_embeddings_under_a_lora_wrapped_lm_head_is_named():
    """``resize_token_embeddings`` after apply_lora with lm_head targeted: transformers 5 resizes the tied weight in
    place and sets ``out_features`` on the output layer (the wrapper), so the misfit check passed and the next
    forward failed with "lora_B must be (out_features, rank)=(70, 4), got (64, 4)" (Python-API trial), naming
    neither the layer's cause nor the way out. The resize (or, for a base weight resized behind the wrapper's back,
    the next forward, on both paths) now says so."""
    import warnings

    from lora_fast import apply_lora

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-target warning
        apply_lora(model, ["c_attn", "lm_head"], rank=4)
    misfit = r"built for \(64, 32\): its adapter \(lora_A \(4, 32\), lora_B \(64, 4\)\) .*resize before apply_lora"
    with pytest.raises(ValueError, match=misfit):
        model.resize_token_embeddings(70, mean_resizing=False)
        model(torch.randint(0, 64, (1, 5)))
    head = LinearWithLoRA(nn.Linear(32, 64, bias=False), rank=4)
    with torch.no_grad():
        head.linear.weight.data = torch.zeros(70, 32)  # resized under the wrapper, as tying does
    head.out_features = 70
    for fusable in (True, False):
        if not fusable:
            head.linear.register_forward_hook(lambda *a: None)  # the base(x) + term path
        assert head.fusable() is fusable
        what = r"the base weight has shape \(70, 32\)" if fusable else r"the base's output \(70 features\)"
        with pytest.raises(ValueError, match=rf"LinearWithLoRA: {what}, the layer was " + misfit):
            head(torch.randn(2, 32))


def test_tie_weights_reties_a_lora_wrapped_lm_head_and_a_misfit_is_named():
    """transformers' ``tie_weights()`` sets ``lm_head.weight = wte.weight``; on a LoRA-wrapped lm_head that was a bare
    ``KeyError: "attribute 'weight' already exists"`` (PEFT's layers too). It now sets the base's weight (the
    adapter untouched, the logits unchanged); a weight the adapter was not built for (``resize_token_embeddings``
    after apply_lora) and replacing a merged layer's weight are errors that say so."""
    import warnings

    from lora_fast import apply_lora

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-target warning
        apply_lora(model, ["c_attn", "lm_head"], rank=2)
    nn.init.normal_(model.lm_head.lora.lora_B)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        model.tie_weights()
        assert model.lm_head.linear.weight is model.transformer.wte.weight
        assert torch.equal(model(ids).logits, before)
    head = model.lm_head
    with pytest.raises(ValueError, match=r"shape \(120, 32\), the layer was built for \(100, 32\).*resize"):
        head.weight = nn.Parameter(torch.zeros(120, 32))
    with pytest.raises(ValueError, match=r"base bias set has shape \(100,\), the layer was built for None"):
        head.bias = nn.Parameter(torch.zeros(100))
    assert head.linear.weight is model.transformer.wte.weight and head.linear.bias is None  # untouched
    layer = LinearWithLoRA(nn.Linear(8, 4), rank=2)
    layer.merge_weights()
    with pytest.raises(RuntimeError, match="merged layer"):
        layer.weight = nn.Parameter(torch.zeros(4, 8))
