"""Adapter files: PEFT ↔ lora_fast round trips (GPT-2 Conv1D and Llama nn.Linear), strictness, safe and atomic I/O."""

# ruff: noqa: I001  (tests.triton_interpret is imported first, see below)
from __future__ import annotations

try:  # before peft, which imports triton: triton must first be imported under the interpreter on CPU
    import tests.triton_interpret  # noqa: F401
except ImportError:  # triton missing
    pass

import copy
import json
import os
import re
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import lora_fast
from lora_fast import adapter_files
from lora_fast.adapter import AdapterLoadResult, load_adapter, save_adapter
from lora_fast.inject import apply_lora, lora_layers
from tests.utils import assert_rel_close, MISSING, transformers_major

peft = pytest.importorskip("peft", reason=MISSING["peft"])
transformers = pytest.importorskip("transformers", reason=MISSING["transformers"])
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5  # fp32 end to end: both sides compute the same products, differences are summation order only
VOCAB = 97


def _gpt2(cls_name="GPT2LMHeadModel"):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return getattr(transformers, cls_name)(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


MODELS = {
    # (builder, targets, rank_pattern, alpha_pattern): patterns use PEFT's syntax (suffix regexes)
    "gpt2": (_gpt2, ["c_attn", "c_proj"], {"h.1.attn.c_attn": 2}, {"mlp.c_proj": 5}),
    "llama": (_llama, ["q_proj", "v_proj", "down_proj"], {r"layers\.0\.self_attn\.q_proj": 2}, {"down_proj": 3}),
}


def _ids(batch=2, seq=7):
    return torch.randint(1, VOCAB, (batch, seq))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise_lora(model):
    """Give every LoRA B (zero at init) random values, so the adapter changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)


def _peft_model(base, targets, rank_pattern=None, alpha_pattern=None, use_rslora=False, **kw):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern or {},
                     alpha_pattern=alpha_pattern or {}, use_rslora=use_rslora, **kw)
    with warnings.catch_warnings():  # PEFT warns that it flips fan_in_fan_out for Conv1D targets
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, cfg)
    _randomise_lora(pm)
    return pm.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_saved_adapter_loads_exactly(arch, use_rslora, tmp_path):
    build, targets, rank_pattern, alpha_pattern = MODELS[arch]
    base = build()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, targets, rank_pattern, alpha_pattern, use_rslora, lora_dropout=0.1)
    ids = _ids()
    ref = _logits(pm, ids)
    pm.save_pretrained(tmp_path)

    result = load_adapter(fresh, tmp_path)
    assert result == AdapterLoadResult([], [])
    assert not any(m.training for m in fresh.modules())  # injected layers follow the eval model (dropout off)
    assert_rel_close(_logits(fresh, ids), ref, TOL, f"{arch} logits after loading PEFT's adapter")
    # Per-layer hyper-parameters equal PEFT's (rank_pattern / alpha_pattern / rsLoRA honoured, not just the output).
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")
                   and "default" in getattr(m, "lora_A", {})}
    ours = lora_layers(fresh)
    assert set(ours) == set(peft_layers)
    for name, layer in ours.items():
        assert layer.rank == peft_layers[name].r["default"], name
        assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"], rel=1e-12), name
        assert layer.lora.dropout == 0.1 and layer.lora.use_rslora is use_rslora, name
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        f"{n}.lora.lora_{ab}" for n in ours for ab in "AB"}


def _lora_fast_model(arch):
    """apply_lora in two calls, so that ranks and alphas differ per module (rank_pattern / alpha_pattern)."""
    build, targets, _, _ = MODELS[arch]
    base = build()
    fresh = copy.deepcopy(base)
    apply_lora(base, target_modules=targets[:1], rank=4, alpha=8)
    apply_lora(base, target_modules=targets[1:], rank=2, alpha=3)
    _randomise_lora(base)
    return base, fresh


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_fast_adapter_loads_in_peft_exactly(arch, tmp_path):
    model, fresh = _lora_fast_model(arch)
    ids = _ids()
    ref = _logits(model, ids)
    out_dir = save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["bias"] == "none" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]  # ranks differ, so the patterns must say where

    again = copy.deepcopy(fresh)
    pm = PeftModel.from_pretrained(fresh, out_dir).eval()
    assert_rel_close(_logits(pm, ids), ref, TOL, f"{arch} logits of PEFT loading lora_fast's adapter")
    assert load_adapter(again, out_dir) == AdapterLoadResult([], [])  # and lora_fast reloads its own file
    assert_rel_close(_logits(again, ids), ref, TOL, f"{arch} logits of lora_fast reloading its adapter")
    assert {n: m.rank for n, m in lora_layers(again).items()} == {n: m.rank for n, m in lora_layers(model).items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_saved_keys_and_config_match_peft(arch, tmp_path):
    """Same A/B values through PEFT and lora_fast: identical key set, tensors and config semantics."""
    build, targets, _, _ = MODELS[arch]
    base = build()
    ours = apply_lora(copy.deepcopy(base), target_modules=targets, rank=4, alpha=8)
    _randomise_lora(ours)
    pm = _peft_model(copy.deepcopy(base), targets)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layer = pm.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora.lora_B)
    pm.save_pretrained(tmp_path / "peft")
    save_adapter(ours, tmp_path / "ours")
    theirs_sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(ours_sd) == set(theirs_sd)
    for k in ours_sd:
        assert torch.equal(ours_sd[k], theirs_sd[k]), k
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
                  "rank_pattern", "alpha_pattern"):
        assert ours_cfg[field] == theirs_cfg[field], field
    assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])
    ids = _ids()
    assert_rel_close(_logits(ours, ids), _logits(pm, ids), TOL, "same A/B through both")


def test_seq_cls_head_saved_as_modules_to_save(tmp_path):
    """A trainable classifier head travels as PEFT's modules_to_save (key base_model.model.score.weight)."""
    base = _gpt2("GPT2ForSequenceClassification")
    fresh, fresh2, base_copy = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    model = apply_lora(base, target_modules=["c_attn"], rank=4, alpha=8)
    _randomise_lora(model)
    model.score.requires_grad_(True)
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight))
    ids = _ids()
    ref = _logits(model, ids)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")

    pm = PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    assert_rel_close(_logits(pm, ids), ref, TOL, "PEFT loading a lora_fast SEQ_CLS adapter")
    pm.save_pretrained(tmp_path / "b")  # PEFT's own SEQ_CLS file: modules_to_save ["classifier", "score"]
    assert load_adapter(fresh2, tmp_path / "b") == AdapterLoadResult([], [])
    assert_rel_close(_logits(fresh2, ids), ref, TOL, "lora_fast loading PEFT's SEQ_CLS adapter")
    assert fresh2.score.weight.requires_grad  # trainable again, as in PEFT
    # is_trainable: the trainable set equals PEFT's for the same flag (default here True, PEFT's default False).
    for flag in (True, False):
        ours = copy.deepcopy(base_copy)
        load_adapter(ours, tmp_path / "b", is_trainable=flag)
        theirs = PeftModel.from_pretrained(copy.deepcopy(base_copy), tmp_path / "b", is_trainable=flag)
        peft_set = {re.sub(r"\.(lora_[AB])\.default\.weight$", r".lora.\1", n.removeprefix("base_model.model."))
                    .replace(".modules_to_save.default", "") for n, p in theirs.named_parameters() if p.requires_grad}
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == peft_set, flag
        assert bool(peft_set) is flag
        assert_rel_close(_logits(ours, ids), ref, TOL, f"is_trainable={flag}")
    with pytest.raises(TypeError, match="is_trainable must be True or False"):
        load_adapter(copy.deepcopy(base_copy), tmp_path / "b", is_trainable="no")
    # A SEQ_CLS config that leaves modules_to_save out still means the head travels whole (PEFT adds it itself).
    cfg_b = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**cfg_b, "modules_to_save": None}))
    ours = copy.deepcopy(base_copy)
    assert load_adapter(ours, tmp_path / "b") == AdapterLoadResult([], [])
    assert torch.equal(ours.score.weight, load_file(tmp_path / "b" / "adapter_model.safetensors")[
        "base_model.model.score.weight"])
    assert_rel_close(_logits(ours, ids), ref, TOL, "SEQ_CLS adapter with modules_to_save null")


def test_save_defaults_and_regex_targets(tmp_path):
    model = _llama()
    base = copy.deepcopy(model)
    apply_lora(model, target_modules=r".*\.(q|v)_proj", rank=4)
    _randomise_lora(model)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == r".*\.(q|v)_proj"  # a regex that selects exactly the LoRA layers is kept
    ids = _ids()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()  # PEFT applies the regex the same way
    assert_rel_close(_logits(pm, ids), _logits(model, ids), TOL, "regex targets in PEFT")
    pm.save_pretrained(tmp_path / "peft")  # and PEFT's file with the regex loads here
    assert load_adapter(base, tmp_path / "peft") == AdapterLoadResult([], [])
    assert len(lora_layers(base)) == 4
    assert_rel_close(_logits(base, ids), _logits(model, ids), TOL, "regex targets from PEFT")

    model.config._name_or_path = "tiny/llama"  # not before PEFT's save_pretrained, which looks the name up online
    save_adapter(model, tmp_path / "named")
    cfg = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["task_type"]) == ("tiny/llama", "CAUSAL_LM")
    save_adapter(model, tmp_path / "named", base_model_name_or_path="other", task_type="FEATURE_EXTRACTION")
    cfg = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["task_type"]) == ("other", "FEATURE_EXTRACTION")


def test_mixed_dropout_writes_the_most_common_value_and_warns(tmp_path):
    model = _llama()
    apply_lora(model, target_modules=["q_proj", "v_proj"], rank=4, dropout=0.1)
    layers = list(lora_layers(model).values())
    assert len(layers) >= 3
    layers[0].lora.dropout = 0.2  # one layer differs: the others' value is the adapter's
    with pytest.warns(UserWarning, match=r"different dropout probabilities \[0.1, 0.2\]; .* 0.1 is written"):
        save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    layers[0].lora.dropout = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path)  # one value: nothing to warn about


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layers_to_transform_in_peft_config(arch, tmp_path):
    """PEFT's layers_to_transform: with layers_pattern (Llama) and with its default index rule (GPT-2)."""
    build, targets, _, _ = MODELS[arch]
    base = build()
    fresh = copy.deepcopy(base)
    pattern = {"layers_pattern": "layers"} if arch == "llama" else {}
    pm = _peft_model(base, targets[:2], layers_to_transform=[1], **pattern)
    pm.save_pretrained(tmp_path)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    names = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
                   for n, _ in pm.named_parameters() if "lora_A" in n)
    assert sorted(lora_layers(fresh)) == names and all(".1." in n for n in names)
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, "layers_to_transform adapter")


@pytest.mark.parametrize("exclude", [["transformer.h.0.attn.c_proj"], r".*h\.0\.attn\.c_proj"])
def test_peft_exclude_modules_loads_without_the_excluded_layer(exclude, tmp_path):
    """PEFT's exclude_modules (a list of names/suffixes, or a regex) removes modules target_modules selects: the
    adapter file has no weights for them, and loading must not wrap them."""
    base = _gpt2()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, ["c_attn", "c_proj"], exclude_modules=exclude)
    pm.save_pretrained(tmp_path)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    wrapped = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
                     for n, _ in pm.named_parameters() if "lora_A" in n)
    assert sorted(lora_layers(fresh)) == wrapped and "transformer.h.0.attn.c_proj" not in wrapped
    assert "transformer.h.1.attn.c_proj" in wrapped
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, "exclude_modules adapter")


class _Lookalikes(nn.Module):
    """``h.1.fc`` and ``h11.fc``: as a regex (PEFT reads rank_pattern keys as regexes), "h.1.fc" matches both."""

    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([nn.Linear(8, 8), nn.ModuleDict({"fc": nn.Linear(8, 8)})])
        self.h11 = nn.ModuleDict({"fc": nn.Linear(8, 8)})

    def forward(self, x):
        return self.h11["fc"](self.h[1]["fc"](x))


def test_rank_pattern_of_lookalike_names_is_escaped(tmp_path):
    torch.manual_seed(0)
    base = _Lookalikes()
    fresh, peft_base = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(base, target_modules=r"h\.1\.fc", rank=4, alpha=8)
    apply_lora(base, target_modules=r"h11\.fc", rank=2, alpha=8)  # the adapter's r: the last call's
    _randomise_lora(base)
    save_adapter(base, tmp_path)
    want = {n: m.rank for n, m in lora_layers(base).items()}
    assert want == {"h.1.fc": 4, "h11.fc": 2}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2  # so h.1.fc needs the pattern
    load_adapter(fresh, tmp_path)
    assert {n: m.rank for n, m in lora_layers(fresh).items()} == want
    pm = PeftModel.from_pretrained(peft_base, tmp_path).eval()
    assert {n.removeprefix("base_model.model."): m.r["default"] for n, m in pm.named_modules()
            if hasattr(m, "r") and isinstance(m.r, dict)} == want
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_rel_close(pm(x), base(x), TOL, "PEFT, lookalike names")
        assert_rel_close(fresh(x), base(x), TOL, "lora_fast, lookalike names")


class _NestedSuffix(nn.Module):
    """``proj`` and ``inner.proj``: PEFT's lookup ``(.*\\.)?(key)$`` finds ``inner.proj`` under the key ``proj`` —
    and under its escaped form too, so escaping alone does not tell the two apart."""

    def __init__(self):
        super().__init__()
        self.proj, self.inner, self.out = nn.Linear(8, 8), nn.ModuleDict({"proj": nn.Linear(8, 8)}), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.inner["proj"](self.proj(x)))


@pytest.mark.parametrize("field", ["alpha", "rank"])
def test_a_pattern_key_that_is_a_suffix_of_another_name_stays_its_own(tmp_path, field):
    """The module ``proj`` differs from the rest (alpha 4, or rank 2); its key must not reach ``inner.proj``: the
    key was escaped but unanchored, so PEFT and load_adapter scaled ``inner.proj`` by ``proj``'s alpha (outputs
    off, no error) or built it at ``proj``'s rank (a shape error)."""
    torch.manual_seed(0)
    base = _NestedSuffix()
    fresh, peft_base = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(base, ["inner.proj", "out"], rank=4, alpha=32)
    apply_lora(base, r"proj", rank=2 if field == "rank" else 4, alpha=4 if field == "alpha" else 32)
    apply_lora(base, ["out"], rank=4, alpha=32)  # leaves the config's default at the majority's value
    _randomise_lora(base)
    want = {n: (m.lora.rank, m.lora.alpha) for n, m in lora_layers(base).items()}
    assert len(set(want.values())) == 2 and want["inner.proj"] == want["out"]
    save_adapter(base, tmp_path)
    load_adapter(fresh, tmp_path)
    assert {n: (m.lora.rank, m.lora.alpha) for n, m in lora_layers(fresh).items()} == want
    pm = PeftModel.from_pretrained(peft_base, tmp_path).eval()
    got = {n.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
           for n, m in pm.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}
    assert got == want
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_rel_close(pm(x), base(x), TOL, "PEFT, nested suffix")
        assert_rel_close(fresh(x), base(x), TOL, "lora_fast, nested suffix")


# ------------------------------------------------------------------------------------------------ strict loading
@pytest.fixture
def saved(tmp_path):
    """(directory, base model without LoRA, logits of the adapter model) for a GPT-2 adapter saved by lora_fast."""
    model = _gpt2()
    fresh = copy.deepcopy(model)
    apply_lora(model, target_modules=["c_attn"], rank=4, alpha=8)
    _randomise_lora(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", fresh, model


def _edit_weights(directory, fn):
    path = directory / "adapter_model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_missing_key_is_named_and_strict_false_returns_it(saved):
    directory, fresh, _ = saved
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    _edit_weights(directory, lambda sd: sd.pop(key))
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"Missing 1 key\(s\): " + key.replace(".", r"\.")):
        load_adapter(fresh, directory)
    assert not lora_layers(fresh)  # a failed load leaves the model untouched
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())

    result = load_adapter(fresh, directory, strict=False)
    assert result.missing_keys == [key] and result.unexpected_keys == []
    assert not lora_layers(fresh)["transformer.h.1.attn.c_attn"].lora.lora_B.any()  # left at its zero init


def test_unexpected_key_is_named(saved):
    directory, fresh, model = saved
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"
    _edit_weights(directory, lambda sd: sd.__setitem__(key, torch.zeros(4, 32)))
    with pytest.raises(ValueError, match=r"Unexpected 1 key\(s\): " + key.replace(".", r"\.")):
        load_adapter(fresh, directory)
    result = load_adapter(fresh, directory, strict=False)
    assert result == AdapterLoadResult([], [key])
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(model, ids), TOL, "the keys that fit are loaded")


def test_misshaped_key_is_named_even_when_not_strict(saved):
    directory, fresh, _ = saved
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    _edit_weights(directory, lambda sd: sd.__setitem__(key, torch.zeros(4, 31)))
    for strict in (True, False):
        with pytest.raises(ValueError, match=key.replace(".", r"\.") + r" \(expected \(4, 32\), file has \(4, 31\)\)"):
            load_adapter(fresh, directory, strict=strict)
    assert not lora_layers(fresh)


def test_rank_mismatch_with_existing_layers_and_alpha_update(saved):
    directory, fresh, model = saved
    other = copy.deepcopy(fresh)
    apply_lora(fresh, target_modules=["c_attn"], rank=8, alpha=1)
    with pytest.raises(ValueError, match=r"expected \(8, 32\), file has \(4, 32\).*already has LoRA layers of rank "
                                         r"8: .*lora_fast\.unload\(model\)"):
        load_adapter(fresh, directory)
    apply_lora(other, target_modules=["c_attn"], rank=4, alpha=1)  # same rank, wrong alpha: the file's alpha wins
    assert load_adapter(other, directory) == AdapterLoadResult([], [])
    assert all(m.scaling == 2.0 for m in lora_layers(other).values())
    ids = _ids()
    assert_rel_close(_logits(other, ids), _logits(model, ids), TOL, "existing layers reloaded")


def test_an_adapter_of_a_wider_model_is_refused_in_a_few_lines(tmp_path):
    """An adapter saved from another size of the model (n_embd 64, here loaded into 32) mismatches every LoRA key:
    the error listed all of them, each with both shapes (2 KB on one line for 4 layers), and, into a model that
    already had LoRA layers, blamed their rank. It names a few keys, says the feature sizes differ (the file's
    in -> out against the model's, and the base model the config names) and never points at the rank or the
    vocabulary; nothing is loaded."""
    wide = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0))
    apply_lora(wide, target_modules="all-linear", rank=4, alpha=8)
    with pytest.warns(UserWarning, match="could not read the config of the base model 'tiny-gpt2-64'"):
        save_adapter(wide, tmp_path / "wide", base_model_name_or_path="tiny-gpt2-64")
    narrow = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0))
    injected = copy.deepcopy(narrow)
    apply_lora(injected, target_modules="all-linear", rank=4, alpha=8)
    for model in (narrow, injected):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError) as err:
            load_adapter(model, tmp_path / "wide")
        msg = str(err.value)
        assert msg.startswith(f"load_adapter: 32 mis-shaped key(s) in {tmp_path / 'wide'}")
        assert "16 of the 16 LoRA layers have other feature sizes" in msg
        assert "transformer.h.0.attn.c_attn: 64 -> 192 in the file, 32 -> 96 in this GPT2LMHeadModel" in msg
        assert "'tiny-gpt2-64'" in msg and "... and 28 more" in msg
        assert "rank" not in msg and "vocabulary" not in msg
        assert len(msg) < 1000, len(msg)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not lora_layers(narrow)


def test_swapping_to_an_adapter_without_the_previous_ones_modules_to_save_is_refused(tmp_path):
    """Adapter E trains lm_head whole (modules_to_save), F does not. Loading F into a model holding E kept E's
    trained head without a word: the outputs were not F's (1.75 off PEFT's loading of F), and a save_adapter wrote
    the head into F's files. The head's original weights are gone (trained in place): refused, the model as it was."""
    base = _gpt2()

    def make(to_save, seed, rank=4):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        apply_lora(model, target_modules=["c_attn"], rank=rank, alpha=8, modules_to_save=to_save)
        _randomise_lora(model)
        if to_save:
            with torch.no_grad():
                model.lm_head.weight.add_(0.1)  # "trained"
        save_adapter(model, tmp_path / str(seed))
        return tmp_path / str(seed)

    with_head, plain, plain8, head8 = make(["lm_head"], 1), make(None, 2), make(None, 3, 8), make(["lm_head"], 4, 8)
    model = copy.deepcopy(base)
    load_adapter(model, with_head)
    before = copy.deepcopy(model.state_dict())
    for other in (plain, plain8):  # of another rank too: this is said first (unload would keep the head as well)
        with pytest.raises(ValueError, match=r"holds modules saved whole by its previous adapter \(lm_head\), "
                                             r"which .* does not list"):
            load_adapter(model, other)
    with pytest.raises(ValueError, match=r"rank 4: .*load it into a fresh base model\)?$") as e:
        load_adapter(model, head8)
    assert "unload" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    load_adapter(model, with_head)  # the same adapter again (its head listed): still loads
    fresh = copy.deepcopy(base)
    load_adapter(fresh, plain)
    peft_plain = PeftModel.from_pretrained(copy.deepcopy(base), plain).eval()
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(peft_plain, ids), TOL, "F into a fresh base is F")


def test_file_settings_reach_existing_layers_and_peft(tmp_path):
    """A fractional alpha (6.5), rsLoRA and dropout 0.1 are written as such and read back by PEFT with the same
    scaling (same logits); loading into a model whose layers already exist (rank 4, alpha 8, no rsLoRA, no dropout)
    gives those layers the file's alpha, rsLoRA flag and dropout, and a second save writes them again."""
    src = _gpt2()
    dst = copy.deepcopy(src)
    plain = copy.deepcopy(src)
    apply_lora(src, ["c_attn"], rank=4, alpha=6.5, use_rslora=True, dropout=0.1).eval()
    _randomise_lora(src)
    save_adapter(src, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["lora_alpha"], cfg["use_rslora"], cfg["lora_dropout"]) == (6.5, True, 0.1)
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(plain, tmp_path / "a").eval()
    assert_rel_close(_logits(pm, ids), _logits(src, ids), TOL, "PEFT reads alpha 6.5 with rsLoRA")
    apply_lora(dst, ["c_attn"], rank=4, alpha=8)
    load_adapter(dst, tmp_path / "a")
    for m in lora_layers(dst).values():
        assert (m.lora.alpha, m.lora.use_rslora, m.lora.dropout, m.scaling) == (6.5, True, 0.1, 6.5 / 2)
    assert_rel_close(_logits(dst.eval(), ids), _logits(src, ids), TOL, "existing layers")
    save_adapter(dst, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text()) == cfg


def test_backend_and_non_float_tensors_on_load(saved, tmp_path):
    """``backend=`` reaches layers that already exist (None leaves their own choice); an integer tensor under an
    adapter key is refused by name, nothing loaded."""
    directory, fresh, _ = saved
    apply_lora(fresh, target_modules=["c_attn"], rank=4, alpha=8, backend="auto")
    load_adapter(fresh, directory)
    assert {m.backend for m in lora_layers(fresh).values()} == {"auto"}
    load_adapter(fresh, directory, backend="reference")
    assert {m.backend for m in lora_layers(fresh).values()} == {"reference"}
    state = load_file(directory / "adapter_model.safetensors")
    key = sorted(state)[0]
    state[key] = state[key].to(torch.int32)
    (tmp_path / "bad").mkdir()
    save_file(state, tmp_path / "bad" / "adapter_model.safetensors")
    (tmp_path / "bad" / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match=rf"{re.escape(key)} \(dtype torch.int32 is not floating point\)"):
        load_adapter(fresh, tmp_path / "bad")
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())


@pytest.mark.parametrize("name", ["transformer.h.0.attn.c_proj", "transformer.h.10.attn.c_attn", "h.0.mlp.c_proj",
                                  "transformer.h.1.mlp.c_fc"])
def test_pattern_keys_match_as_peft(name):
    """rank_pattern/alpha_pattern keys match a dot-bounded suffix, as PEFT's own ``get_pattern_key``: "proj" does not
    match "c_proj", "h.0" does not match "h.10" nor a name that only contains it."""
    from peft.utils.other import get_pattern_key

    from lora_fast.adapter_config import pattern_value

    for keys in (["proj"], ["c_proj"], ["h.0"], [r"h\.0\.attn\.c_proj"], ["h.1.mlp.c_fc"], ["attn.c_attn"],
                 ["mlp.c_proj", "c_proj"], [r"h\.1\d\.attn\.c_attn", "c_attn"]):
        patterns = {k: i + 1 for i, k in enumerate(keys)}
        peft_key = get_pattern_key(list(patterns), name)
        assert pattern_value(patterns, name, 0) == patterns.get(peft_key, 0), (keys, name)


def test_non_strict_load_leaves_layers_absent_from_the_file_alone(saved):
    """strict=False into a model with more LoRA layers than the file: the file's alpha/rsLoRA/dropout go to the
    layers it loads only; the others keep their scaling (they used to take the file's alpha, 0.25x here)."""
    directory, fresh, _ = saved  # c_attn only, rank 4, alpha 8
    apply_lora(fresh, target_modules=["c_attn", "c_fc"], rank=4, alpha=32, dropout=0.2)
    c_fc = {n: m for n, m in lora_layers(fresh).items() if n.endswith("c_fc")}
    result = load_adapter(fresh, directory, strict=False)
    assert sorted(result.missing_keys) == sorted(f"base_model.model.{n}.lora_{ab}.weight" for n in c_fc for ab in "AB")
    assert all(m.scaling == 8.0 and m.lora.dropout == 0.2 for m in c_fc.values())
    assert all(m.scaling == 2.0 for n, m in lora_layers(fresh).items() if n.endswith("c_attn"))


@pytest.mark.parametrize("field, value, message", [
    ("rank_pattern", {"c_attn(": 4}, r"rank_pattern key 'c_attn\(' is not a valid regular expression \(missing \)"),
    ("alpha_pattern", {"*c_attn": 4}, r"alpha_pattern key '\*c_attn' is not a valid regular expression \(nothing to"),
    ("exclude_modules", "((", r"exclude_modules '\(\(' is not a valid regular expression"),
    ("target_modules", "c_attn[", r"target_modules 'c_attn\[' is not a valid regular expression"),
    ("target_modules", 3, r"target_modules must be a regex string or a list of module names, got 3"),
    ("modules_to_save", "lm_head", r"modules_to_save must be a list of module names, got 'lm_head'"),
    ("layers_to_transform", "0", r"layers_to_transform must be a layer index or a list of layer indices, got '0'"),
    ("layers_pattern", 1, r"layers_pattern must be a string or a list of strings, got 1"),
    ("rank_pattern", ["c_attn"], r"rank_pattern must be a mapping of module-name patterns to values"),
])
def test_a_mistyped_or_invalid_config_field_is_named(saved, field, value, message):
    """Hand-edited or foreign configs: a bad regex used to surface as a bare re.error without the field or file, and
    a string where a list belongs was read letter by letter (modules_to_save "lm_head" left out every module with
    an "h" in its name, and the error blamed target_modules)."""
    directory, fresh, _ = saved
    cfg_path = directory / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, field: value, **({"target_modules": ["c_attn"]}
                                                             if field == "layers_pattern" else {})}))
    with pytest.raises(ValueError, match=r"load_adapter: .*adapter_config.json: " + message):
        load_adapter(fresh, directory)
    assert not lora_layers(fresh)  # refused before anything was injected


def test_unsupported_config_and_models_are_refused(saved, tmp_path):
    directory, fresh, model = saved
    cfg_path = directory / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(fresh, directory)
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3"):
        load_adapter(fresh, directory)
    cfg_path.write_text(json.dumps({**cfg, "rank_pattern": {"h.1.attn.c_attn": 0}}))
    with pytest.raises(ValueError, match=r"adapter_config.json.*rank_pattern\['h.1.attn.c_attn'\] must be a "
                       r"positive int, got 0"):  # the config file is named, not the weights
        load_adapter(fresh, directory)
    cfg_path.write_text(json.dumps({**cfg, "target_modules": ["nope"]}))
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] .* match no module"):
        load_adapter(fresh, directory)
    with pytest.raises(ValueError, match="no lora_fast LoRA layer"):
        save_adapter(_gpt2(), tmp_path / "x")
    lora_layers(model)["transformer.h.1.attn.c_attn"].lora.use_rslora = True
    with pytest.raises(ValueError, match="one use_rslora .*transformer.h.1.attn.c_attn"):
        save_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())  # nothing half-written
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        load_adapter(fresh, tmp_path)
    with pytest.raises(TypeError, match="PEFT model"):
        save_adapter(_peft_model(_gpt2(), ["c_attn"]), tmp_path / "y")
    for peft_side in (_peft_model(_gpt2(), ["c_attn"]), _peft_model(_gpt2(), ["c_attn"]).get_base_model()):
        with pytest.raises(TypeError, match=r"carries PEFT's adapter \(peft_config: a PeftModel, or the model inside"):
            load_adapter(peft_side, directory)
    with pytest.raises(TypeError, match="nn.Module"):
        load_adapter("model", directory)
    assert not lora_layers(fresh)


# ---------------------------------------------------------------------------------------------- legacy and safety
def test_legacy_tutorial_bin_loads(tmp_path):
    model = _llama()
    fresh = copy.deepcopy(model)
    apply_lora(model, target_modules=["q_proj", "v_proj"], rank=4, alpha=8, dropout=0.1, use_rslora=True).eval()
    _randomise_lora(model)
    lora_sd = {k: v for k, v in model.state_dict().items() if ".lora.lora_" in k}  # <module>.lora.lora_A/B
    torch.save({"lora_state_dict": lora_sd, "config": dict(model.lora_fast_config)}, tmp_path / "adapter_model.bin")
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    # its rank/alpha/dropout names are lora_fast's: all three carry over (dropout matters when training goes on)
    assert {(m.rank, m.lora.alpha, m.lora.dropout, m.lora.use_rslora) for m in lora_layers(fresh).values()} == {
        (4, 8.0, 0.1, True)}
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(model, ids), TOL, "legacy tutorial adapter")

    # An adapter_config.json beside it: accepted when it makes the same adapter of the model (PEFT's field names,
    # its own list order, target_modules spelled otherwise, fields that are only notes), refused when it makes
    # another (the message says what differs), never silently preferred.
    save_adapter(model, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    for same in ({"target_modules": written["target_modules"][::-1]}, {"target_modules": r".*\.(q|v)_proj"},
                 {"lora_alpha": 8.0, "base_model_name_or_path": "elsewhere"}):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**written, **same}))
        assert load_adapter(_llama(), tmp_path) == AdapterLoadResult([], []), same
    for other, what in (({"r": 8}, r"targets: model.layers.0.self_attn.q_proj \(4, 8.0\) vs \(8, 8.0\)"),
                        ({"use_rslora": False}, "use_rslora: True vs False"),
                        ({"lora_dropout": 0.0}, "lora_dropout: 0.1 vs 0.0"),
                        ({"target_modules": ["q_proj"]},
                         r"targets: model.layers.0.self_attn.v_proj \(4, 8.0\) vs None"),
                        ({"exclude_modules": ["model.layers.1.self_attn.q_proj"]}, "layers.1.self_attn.q_proj"),
                        ({"layers_to_transform": [0], "layers_pattern": "layers"}, "layers.1.self_attn")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**written, **other}))
        fresh = _llama()
        with pytest.raises(ValueError, match=rf"adapter_model.bin carries its own config, and .*adapter_config.json "
                                             rf"beside it makes another adapter of LlamaForCausalLM \(.*{what}"):
            load_adapter(fresh, tmp_path)
        assert not lora_layers(fresh)


def test_legacy_gpt2_bin_beside_its_own_config_loads(tmp_path):
    """GPT-2 (Conv1D): the json says fan_in_fan_out true, the legacy config never mentions it (the layout comes from
    the module type), and target_modules None means GPT-2's default c_attn: the same adapter, so it loads."""
    model = _gpt2()
    fresh = copy.deepcopy(model)
    apply_lora(model, rank=4, alpha=8)  # target_modules None: c_attn
    _randomise_lora(model)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    (tmp_path / "adapter_model.safetensors").unlink()
    lora_sd = {k: v for k, v in model.state_dict().items() if ".lora.lora_" in k}
    torch.save({"lora_state_dict": lora_sd, "config": dict(model.lora_fast_config)}, tmp_path / "adapter_model.bin")
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(model, ids), TOL, "legacy GPT-2 adapter beside its json")


def test_peft_bin_loads(tmp_path):
    base = _gpt2()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, ["c_attn"])
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, "PEFT .bin adapter")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"lora_state_dict": {}, "config": {"rank": 4}, "x": _Evil(str(marker))},
               tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_adapter(_gpt2(), tmp_path)
    assert not marker.exists()


def test_a_tensor_spelled_both_ways_in_one_file_is_refused(saved):
    """lora_fast's state-dict spelling (``<m>.lora.lora_B``) and PEFT's (``base_model.model.<m>.lora_B.weight``) both
    load, as one tensor. A file holding both used to keep whichever came later and report a clean load (here: the
    zeros, an adapter without that layer's update); which one is meant is unknown, so it is refused, naming both."""
    directory, fresh, model = saved
    peft_key, ours = ("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight",
                      "transformer.h.0.attn.c_attn.lora.lora_B")
    sd = load_file(directory / "adapter_model.safetensors")
    save_file({k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora.lora_A")
               .replace(".lora_B.weight", ".lora.lora_B"): v for k, v in sd.items()},
              directory / "adapter_model.safetensors")  # every key in lora_fast's spelling: the same adapter
    ids = _ids()
    assert load_adapter(copy.deepcopy(fresh), directory) == AdapterLoadResult([], [])
    both = {**sd, ours: torch.zeros_like(sd[peft_key])}
    save_file(both, directory / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors holds '{re.escape(peft_key)}' and "
                                         rf"'{re.escape(ours)}', two spellings of one tensor"):
        load_adapter(fresh, directory)
    assert not lora_layers(fresh)  # refused before the model changed
    del both[peft_key]  # one spelling again: loads, and it is that tensor that is loaded
    save_file(both, directory / "adapter_model.safetensors")
    load_adapter(fresh, directory)
    assert torch.equal(lora_layers(fresh)["transformer.h.0.attn.c_attn"].lora.lora_B, both[ours])
    assert not torch.allclose(_logits(fresh, ids), _logits(model, ids))


@pytest.mark.parametrize("config", [[["rank", 4], ["alpha", 8]], "rank=4", [1, 2], ("r", 4)],
                         ids=["list-of-pairs", "str", "list", "tuple"])
def test_a_legacy_bin_config_that_is_no_dict_is_refused(tmp_path, config):
    """The embedded config must be a dict: ``dict(config)`` used to read a list of pairs as one (and load it) and
    fail on anything else with a bare ValueError/TypeError naming neither the file nor the field."""
    model = apply_lora(_gpt2(), ["c_attn"], rank=4, alpha=8)
    lora_sd = {k: v for k, v in model.state_dict().items() if ".lora.lora_" in k}
    torch.save({"lora_state_dict": lora_sd, "config": config}, tmp_path / "adapter_model.bin")
    fresh = _gpt2()
    with pytest.raises(ValueError, match=rf"load_adapter: {re.escape(str(tmp_path / 'adapter_model.bin'))}: its "
                                         rf"'config' is a {type(config).__name__}, not a dict"):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh)
    torch.save({"lora_state_dict": lora_sd, "config": None}, tmp_path / "adapter_model.bin")  # no config: the json's
    save_adapter(model, tmp_path / "saved")
    (tmp_path / "adapter_config.json").write_bytes((tmp_path / "saved" / "adapter_config.json").read_bytes())
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])


def test_errors_in_a_legacy_bins_own_config_name_that_config(tmp_path):
    """A bad value in the .bin's embedded config was reported against adapter_config.json, a file that need not
    exist (or exists and is fine). Each config's errors name where it came from: ``<bin> ['config']`` or the json."""
    model = apply_lora(_gpt2(), ["c_attn"], rank=4, alpha=8)
    lora_sd = {k: v for k, v in model.state_dict().items() if ".lora.lora_" in k}
    bin_path = tmp_path / "adapter_model.bin"
    save_adapter(model, tmp_path / "saved")
    json_text = (tmp_path / "saved" / "adapter_config.json").read_text()
    bad_configs = (({"rank": "4"}, "r must be a positive int, got '4'"),
                   ({"use_dora": True}, "uses {'use_dora': True}"),
                   ({"task_type": "causal_lm"}, "task_type 'causal_lm' is not one of PEFT's"),
                   ({"target_modules": ["nope"]}, "match no module"))
    for beside in (False, True):  # no json, then a valid json beside it (which a differing config would also fail)
        if beside:
            (tmp_path / "adapter_config.json").write_text(json_text)
        for bad, says in bad_configs[:3] if beside else bad_configs:
            torch.save({"lora_state_dict": lora_sd, "config": {**model.lora_fast_config, **bad}}, bin_path)
            fresh = _gpt2()
            with pytest.raises(ValueError, match=r"load_adapter: ") as caught:
                load_adapter(fresh, tmp_path)
            assert f"{bin_path} ['config']" in str(caught.value) and says in str(caught.value), str(caught.value)
            assert "adapter_config.json" not in str(caught.value), str(caught.value)
            assert not lora_layers(fresh)
    # and the other way round: a bad json beside a good embedded config names the json
    torch.save({"lora_state_dict": lora_sd, "config": dict(model.lora_fast_config)}, bin_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**json.loads(json_text), "r": 0}))
    with pytest.raises(ValueError, match=rf"load_adapter: {re.escape(str(tmp_path / 'adapter_config.json'))}: r "
                                         "must be a positive int, got 0"):
        load_adapter(_gpt2(), tmp_path)


def test_a_directory_where_a_file_goes_fails_the_save_before_touching_the_previous_adapter(tmp_path):
    """A previous adapter (PEFT's .bin form) beside a directory named adapter_model.safetensors: the save used to
    unlink the old adapter_config.json, then fail renaming the weights onto the directory (IsADirectoryError), and
    the previous adapter no longer loaded. The targets are checked first: the save fails naming the path, and
    nothing in the directory changes."""
    base = _gpt2()
    pm = _peft_model(copy.deepcopy(base), ["c_attn"])
    pm.save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "adapter_model.safetensors").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    ids = _ids()
    ref = _logits(pm, ids)
    other = apply_lora(copy.deepcopy(base), ["c_attn"], rank=4, alpha=32)  # another alpha: another config
    _randomise_lora(other)
    with pytest.raises(IsADirectoryError, match=rf"save_adapter: {re.escape(str(tmp_path))}.adapter_model."
                                                r"safetensors: a directory where the adapter's file"):
        save_adapter(other, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # no temp files either
    assert (tmp_path / "adapter_model.safetensors").is_dir()
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    assert_rel_close(_logits(fresh, ids), ref, TOL, "the previous adapter after the refused save")


def test_json_is_read_as_utf8_whatever_the_locale(tmp_path):
    """JSON files are UTF-8 (RFC 8259): adapter_config.json and the base model's config.json were read in the
    locale's encoding, so under a non-UTF-8 locale (C/POSIX without UTF-8 mode, Windows code pages) a config with
    a non-ASCII character failed to load, and the base's vocabulary size was not read (the resized embeddings were
    left out of the save). Runs in a subprocess: the locale encoding is fixed at interpreter start."""
    import subprocess
    import sys

    script = r"""
import json, locale, sys, warnings
from pathlib import Path
import transformers
from lora_fast import apply_lora, load_adapter, save_adapter
from safetensors.torch import load_file
out, enc = Path(sys.argv[1]), locale.getencoding()
base_dir = out / "base"
base_dir.mkdir()
cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, n_positions=8)
base_cfg = {**cfg.to_dict(), "_name_or_path": "mod\u00e8le-\u00fc"}  # vocab 50: the model below resized it to 60
(base_dir / "config.json").write_bytes(json.dumps(base_cfg, ensure_ascii=False).encode("utf-8"))
cfg.vocab_size = 60
model = apply_lora(transformers.GPT2LMHeadModel(cfg), ["c_attn"], rank=2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    save_adapter(model, out / "a", base_model_name_or_path=str(base_dir))
keys = sorted(load_file(out / "a" / "adapter_model.safetensors"))
path = out / "a" / "adapter_config.json"
edited = {**json.loads(path.read_bytes()), "base_model_name_or_path": "mod\u00e8le-\u00fc"}
path.write_bytes(json.dumps(edited, ensure_ascii=False).encode("utf-8"))
try:
    load_adapter(transformers.GPT2LMHeadModel(cfg), out / "a")
    loaded = "ok"
except ValueError as e:
    loaded = str(e)
print(json.dumps({"encoding": enc, "keys": keys, "loaded": loaded,
                  "warnings": [str(w.message) for w in caught if "could not read" in str(w.message)]}))
"""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, "-X", "utf8=0", "-c", script, str(tmp_path)], capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["encoding"].lower().replace("-", "") in ("utf8", "cp65001"):
        pytest.skip(f"no non-UTF-8 locale here (the C locale's encoding is {got['encoding']})")
    assert got["loaded"] == "ok", got["loaded"]
    assert not got["warnings"], got["warnings"]
    assert {"base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight"} <= set(got["keys"]), (
        "the base's vocabulary (50) differs from the model's (60): its embeddings belong in the adapter")


@pytest.mark.parametrize("fail_at", [0, 1])
def test_interrupted_save_keeps_previous_adapter(saved, monkeypatch, fail_at):
    directory, _, model = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with torch.no_grad():
        next(iter(lora_layers(model).values())).lora.lora_B.add_(1.0)  # the new save would differ ...
    for layer in lora_layers(model).values():  # ... in both files (an unchanged config is not rewritten)
        layer.lora.alpha, layer.lora.scaling = 16.0, 16.0 / 4
    calls = []

    def interrupted(fh, data):
        calls.append(len(data))
        if len(calls) - 1 == fail_at:
            fh.write(data[: len(data) // 2])  # half a file, then the "crash"
            raise KeyboardInterrupt("simulated interruption")
        fh.write(data)

    monkeypatch.setattr(adapter_files, "_write_file", interrupted)  # the seam in _atomic_write_all
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, directory)
    assert len(calls) == fail_at + 1
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # old files intact, no temp files left
    monkeypatch.undo()
    save_adapter(model, directory)
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert {p.name: p.read_bytes() for p in directory.iterdir()} != before


@pytest.mark.parametrize("fail_at_rename", [1, 2])
def test_save_interrupted_between_renames_never_pairs_new_weights_with_the_old_config(saved, monkeypatch,
                                                                                      fail_at_rename):
    """Overwriting an adapter with another alpha (same shapes: nothing else would tell the files apart) and
    interrupted at either rename: the directory holds the old adapter whole or no config, which loading refuses
    naming the file. Before, the new weights sat beside the old config and loaded with the old alpha."""
    directory, fresh, model = saved
    for layer in lora_layers(model).values():
        layer.lora.alpha, layer.lora.scaling = 32.0, 32.0 / 4
    _randomise_lora(model)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at_rename:
            raise KeyboardInterrupt("simulated interruption")
        return real(src, dst)

    monkeypatch.setattr(adapter_files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, directory)
    monkeypatch.undo()
    assert not any(p.name.endswith(".tmp") for p in directory.iterdir())
    assert not (directory / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(copy.deepcopy(fresh), directory)
    save_adapter(model, directory)  # a finished save is whole again
    assert json.loads((directory / "adapter_config.json").read_text())["lora_alpha"] == 32


def test_save_with_an_unchanged_config_is_one_rename(saved, monkeypatch):
    """Saving new weights of the same adapter (a run's checkpoints) renames the weights alone, the config being
    byte-identical: one atomic step, no window at all; the config on disk is left untouched."""
    directory, _, model = saved
    config = directory / "adapter_config.json"
    stamp = config.stat().st_ino, config.read_bytes()
    _randomise_lora(model)
    real, calls = os.replace, []
    monkeypatch.setattr(adapter_files.os, "replace",
                        lambda src, dst: calls.append(os.path.basename(dst)) or real(src, dst))
    save_adapter(model, directory)
    assert calls == ["adapter_model.safetensors"]
    assert (config.stat().st_ino, config.read_bytes()) == stamp
    assert not any(p.name.endswith(".tmp") for p in directory.iterdir())


def test_failed_save_into_a_new_directory_leaves_no_directory(tmp_path, monkeypatch):
    """A save that fails while writing into a directory it created removes what it created (the save is all or
    nothing); a directory that was there before stays."""
    model = _gpt2()
    apply_lora(model, target_modules=["c_attn"], rank=2)

    def interrupted(fh, data):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(adapter_files, "_write_file", interrupted)
    (tmp_path / "runs").mkdir()
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "runs" / "new" / "nested")
    assert sorted(os.listdir(tmp_path)) == ["runs"] and os.listdir(tmp_path / "runs") == []
    monkeypatch.undo()
    real, calls = os.replace, []

    def replace(src, dst):  # the weights renamed in, then the config's rename fails
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(src, dst)

    monkeypatch.setattr(adapter_files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "runs" / "new")
    assert os.listdir(tmp_path / "runs") == []


def test_lazy_exports():
    """The lazily imported names resolve, and ``dir(lora_fast)`` (tab completion) lists them: it listed neither
    save_adapter nor load_adapter (Python-API trial)."""
    assert lora_fast.save_adapter is save_adapter and lora_fast.load_adapter is load_adapter
    assert set(lora_fast.__all__) <= set(dir(lora_fast))
    assert all(getattr(lora_fast, name) is not None for name in lora_fast.__all__)


def test_seq_cls_adapter_always_carries_its_head_for_peft(tmp_path):
    """PEFT always saves a SEQ_CLS head (modules_to_save) and expects it when loading: so does save_adapter,
    even when the user left the head frozen."""
    torch.manual_seed(0)
    model = _gpt2("GPT2ForSequenceClassification")
    apply_lora(model, ["c_attn"], rank=2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.lora_B.normal_()
    assert not model.score.weight.requires_grad
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    torch.manual_seed(0)
    fresh = _gpt2("GPT2ForSequenceClassification")  # the same base weights ...
    torch.nn.init.normal_(fresh.score.weight)  # ... but another head: the loaded one must come from the file
    theirs = PeftModel.from_pretrained(fresh, tmp_path).eval()
    ids = torch.randint(1, VOCAB, (2, 7))
    assert_rel_close(theirs(ids).logits, model(ids).logits, TOL, "SEQ_CLS logits")


def test_tied_modules_to_save_head_loads_without_touching_the_embeddings(tmp_path):
    """A PEFT adapter with modules_to_save=["lm_head"] on GPT-2 (lm_head tied to wte): PEFT keeps its own copy
    of the head, so loading must not overwrite the input embeddings through the tie (warned, untied)."""
    torch.manual_seed(0)
    base = _gpt2()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                        fan_in_fan_out=True, modules_to_save=["lm_head"]))
    _randomise_lora(pm)
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)  # a trained head
    pm.save_pretrained(tmp_path)
    ids = _ids()
    ref = _logits(pm, ids)
    model = copy.deepcopy(base)
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"lm_head.weight \(was tied to transformer.wte.weight\)"):
        load_adapter(model, tmp_path)
    assert torch.equal(model.transformer.wte.weight, wte)  # the embeddings are untouched
    assert_rel_close(_logits(model, ids), ref, TOL, "logits vs PEFT")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_modifying_inits_are_refused(tmp_path, init):
    """Adapters whose initialisation changed the base weights (PiSSA, OLoRA, CorDA subtract components of W₀;
    LoftQ, LoRA-GA replace it) cannot be added to an unmodified base: refused by name, model untouched."""
    model = apply_lora(_gpt2(), ["c_attn"], rank=4)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    target = _gpt2()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=f"init_lora_weights': '{init}'"):
        load_adapter(target, tmp_path)
    assert target.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_trained_tied_parameter_round_trips(tmp_path):
    """A trainable parameter tied to another (GPT-2 wte ~ lm_head) is one tensor in training: save_adapter says
    ensure_weight_tying so that load_adapter keeps the tie and the reloaded model equals the trained one."""
    torch.manual_seed(0)
    base = _gpt2()
    model = apply_lora(copy.deepcopy(base), ["c_attn"], rank=4)
    _randomise_lora(model)
    model.transformer.wte.weight.requires_grad_(True)
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.3)  # "trained" embeddings, shared with lm_head
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(model, ids), TOL, "reloaded vs trained")


# ------------------------------------------------------------------------ PEFT's full-weight keys, config defaults
def _tied_llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


TIED = {"gpt2": (_gpt2, "transformer.wte", ["c_attn"]), "tied_llama": (_tied_llama, "model.embed_tokens",
                                                                       ["q_proj", "v_proj"])}


def _non_lora(directory):
    return {k: v for k, v in load_file(directory / "adapter_model.safetensors").items() if "lora_" not in k}


def _peft_trained_tied(base, directory, targets, to_save, fan_in_fan_out):
    """A PEFT adapter with ``ensure_weight_tying``, its LoRA and whole modules "trained" (perturbed), saved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            modules_to_save=to_save, ensure_weight_tying=True,
                                                            fan_in_fan_out=fan_in_fan_out))
    _randomise_lora(pm)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.5)
    pm.eval().save_pretrained(directory)
    return pm


@pytest.mark.parametrize("arch", list(TIED))
def test_trained_tied_embeddings_match_peft_both_ways(arch, tmp_path):
    """Input embeddings tied to lm_head and trained (modules_to_save + ensure_weight_tying): lora_fast writes the
    keys and config PEFT writes (the tied partner lm_head.weight too: PEFT needs it), and each side loads the
    other's file to the same logits."""
    build, emb, targets = TIED[arch]
    torch.manual_seed(0)
    base = build()
    assert base.lm_head.weight is base.get_submodule(emb).weight
    ids = _ids()
    # lora_fast trains the adapter and the (tied) embeddings, PEFT loads
    ours = apply_lora(copy.deepcopy(base), targets, rank=4, alpha=8)
    _randomise_lora(ours)
    ours.get_submodule(emb).requires_grad_(True)
    with torch.no_grad():
        ours.get_submodule(emb).weight.add_(torch.randn_like(ours.get_submodule(emb).weight) * 0.5)
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_rel_close(_logits(theirs, ids), _logits(ours, ids), TOL, f"{arch}: PEFT loading lora_fast's tied adapter")
    # PEFT trains with its tied recipe, lora_fast loads
    pm = _peft_trained_tied(base, tmp_path / "peft", targets, ["lm_head"], arch == "gpt2")
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path / "peft") == AdapterLoadResult([], [])
    # the tie is kept where PEFT keeps it: PEFT rewrote modules_to_save to the embedding, and it re-ties only an
    # entry named embed_tokens/lm_head (Llama), not GPT-2's wte — lm_head loads its own key there, the same values
    assert (fresh.lm_head.weight is fresh.get_submodule(emb).weight) == (arch == "tied_llama")
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, f"{arch}: lora_fast loading PEFT's tied adapter")
    # the same files: keys, and the config fields that say how the tie is handled
    assert set(_non_lora(tmp_path / "ours")) == set(_non_lora(tmp_path / "peft")) == {
        f"base_model.model.{emb}.weight", "base_model.model.lm_head.weight"}
    for field in ("modules_to_save", "ensure_weight_tying"):
        assert (json.loads((tmp_path / "ours" / "adapter_config.json").read_text())[field]
                == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[field]), field


def test_ensure_weight_tying_on_a_module_peft_does_not_tie_loads_untied_as_peft(tmp_path):
    """PEFT 0.21 honours ``ensure_weight_tying`` for a modules_to_save entry named ``embed_tokens``/``lm_head`` only;
    for GPT-2's ``wte`` it warns and ``lm_head`` keeps the base's weight. load_adapter kept the tie for any name, so
    the trained ``wte`` became the output head too: logits 7.3 (relative) away from PEFT's. Now as PEFT, both ways."""
    torch.manual_seed(0)
    base = _gpt2()
    _peft_trained_tied(base, tmp_path / "peft", ["c_attn"], ["wte"], True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
        ours = copy.deepcopy(base)
        load_adapter(ours, tmp_path / "peft", is_trainable=False)
    ids = _ids()
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    assert torch.equal(ours.lm_head.weight, base.lm_head.weight)  # the head keeps the base's embeddings, as PEFT's
    assert_rel_close(_logits(ours, ids), _logits(theirs, ids), TOL, "lora_fast loading PEFT's wte adapter")


def test_tied_partner_key_must_agree_with_the_embedding(tmp_path):
    """Two keys that load into one tied tensor (embed_tokens with ensure_weight_tying: PEFT keeps that tie) must
    hold the same values: refused by name, model untouched."""
    torch.manual_seed(0)
    model = apply_lora(_tied_llama(), ["q_proj"], rank=4)
    model.model.embed_tokens.requires_grad_(True)
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        save_adapter(model, tmp_path)
    _edit_weights(tmp_path, lambda sd: sd["base_model.model.lm_head.weight"].add_(1.0))
    fresh = _tied_llama()
    with pytest.raises(ValueError, match=r"lm_head\.weight and base_model\.model\.model\.embed_tokens\.weight "
                                         r"load into one tied tensor"):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh)


def test_peft_lm_head_target_with_its_base_layer_weight(tmp_path):
    """lm_head as a LoRA target: PEFT (save_embedding_layers="auto") also saves lm_head.base_layer.weight; it is
    loaded into the base lm_head and the logits equal PEFT's."""
    torch.manual_seed(0)
    base = _llama()
    pm = _peft_model(copy.deepcopy(base), ["q_proj", "lm_head"])
    with torch.no_grad():
        pm.base_model.model.lm_head.base_layer.weight.add_(0.3)  # the saved base weight must be the one used
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in _non_lora(tmp_path)
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    assert not fresh.lm_head.linear.weight.requires_grad  # a base weight stays frozen
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, "lm_head target vs PEFT")


def test_peft_resized_vocabulary_embeddings_load(tmp_path):
    """After resize_token_embeddings PEFT saves the full embed_tokens and lm_head weights: loaded on a resized base
    they give PEFT's logits; on a base of the old vocabulary the error names the keys and shapes."""
    torch.manual_seed(0)
    _llama().save_pretrained(tmp_path / "base")  # PEFT saves the embeddings: the vocabulary differs from this one

    def resized():
        m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
        m.resize_token_embeddings(VOCAB + 4, mean_resizing=False)
        return m

    base, model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), resized()
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB:].normal_()
        model.lm_head.weight[VOCAB:].normal_()
    pm = _peft_model(model, ["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "adapter")
    assert set(_non_lora(tmp_path / "adapter")) == {"base_model.model.model.embed_tokens.weight",
                                                     "base_model.model.lm_head.weight"}
    fresh = resized()  # new rows not the trained ones: they must come from the file
    assert load_adapter(fresh, tmp_path / "adapter") == AdapterLoadResult([], [])
    ids = torch.tensor([[1, 2, VOCAB + 1, VOCAB + 3]])
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, "resized vocabulary vs PEFT")
    old = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.embed_tokens\.weight \(expected \(97, 32\), "
                                         r"file has \(101, 32\)\).*resize_token_embeddings"):
        load_adapter(old, tmp_path / "adapter")
    assert not lora_layers(old)


def test_layers_to_transform_keeps_full_name_targets(tmp_path):
    """PEFT: a target_modules entry equal to a module's full name selects it whatever layers_to_transform says."""
    base = _llama()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, ["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    pm.save_pretrained(tmp_path)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    assert sorted(lora_layers(fresh)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, "full-name targets with layers_to_transform")


def test_config_without_r_and_alpha_takes_peft_defaults(tmp_path):
    """r and lora_alpha left out of adapter_config.json mean PEFT's defaults (8, 8), in PEFT and here."""
    base = _gpt2()
    model = apply_lora(copy.deepcopy(base), ["c_attn"], rank=8, alpha=8)
    _randomise_lora(model)
    save_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "target_modules": ["c_attn"], "fan_in_fan_out": True}))
    ids = _ids()
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_rel_close(_logits(theirs, ids), _logits(model, ids), TOL, "PEFT with a minimal config")
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    assert all(m.rank == 8 and m.scaling == 1.0 for m in lora_layers(fresh).values())
    assert_rel_close(_logits(fresh, ids), _logits(model, ids), TOL, "lora_fast with a minimal config")


def test_resized_vocabulary_embeddings_are_saved_like_peft(tmp_path):
    """A model whose vocabulary differs from its base directory's config: save_adapter writes the full embedding
    weights as PEFT does (same keys), so PEFT and lora_fast reload it on a freshly resized base exactly."""
    torch.manual_seed(0)
    _llama().save_pretrained(tmp_path / "base")

    def resized(seed):
        torch.manual_seed(seed)  # the new rows are random: a reload must take them from the file
        m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
        m.resize_token_embeddings(VOCAB + 4)
        return m

    model = apply_lora(resized(1), ["q_proj", "v_proj"], rank=4, alpha=8)
    _randomise_lora(model)
    save_adapter(model, tmp_path / "ours")
    pm = _peft_model(resized(1), ["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft")
    assert set(_non_lora(tmp_path / "ours")) == set(_non_lora(tmp_path / "peft")) == {
        "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    ids = torch.tensor([[1, 2, VOCAB + 1, VOCAB + 3]])
    fresh = resized(2)
    assert load_adapter(fresh, tmp_path / "ours") == AdapterLoadResult([], [])
    assert_rel_close(_logits(fresh, ids), _logits(model, ids), TOL, "lora_fast reloading the resized adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(resized(2), tmp_path / "ours").eval()
    assert_rel_close(_logits(theirs, ids), _logits(model, ids), TOL, "PEFT loading the resized adapter")


def _distilbert_cls():
    cfg = transformers.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB,
                                        max_position_embeddings=16, pad_token_id=0)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


def _roberta_cls():
    cfg = transformers.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=24,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def test_seq_cls_modules_to_save_match_by_suffix_as_peft_both_ways(tmp_path):
    """PEFT wraps every module whose name *ends with* a modules_to_save entry (no '.' boundary): a SEQ_CLS adapter
    of DistilBERT carries ``pre_classifier`` beside ``classifier``. Ours must save it (PEFT needs it to load) and
    load it from PEFT's files (strictly, with PEFT's logits; it was 'unexpected' before)."""
    torch.manual_seed(0)
    base = _distilbert_cls()
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    ours = apply_lora(copy.deepcopy(base), ["q_lin", "v_lin"], rank=2)
    _randomise_lora(ours)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == [
        "pre_classifier", "classifier"]
    ids = _ids()
    theirs = PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    assert_rel_close(_logits(theirs, ids), _logits(ours, ids), TOL, "ours -> PEFT")

    pm = _peft_model(copy.deepcopy(base), ["q_lin", "v_lin"], task_type="SEQ_CLS")
    with torch.no_grad():  # a trained pre_classifier: loading must not drop it
        pm.base_model.model.pre_classifier.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path / "peft")
    assert load_adapter(fresh2, tmp_path / "peft") == AdapterLoadResult([], [])
    assert_rel_close(_logits(fresh2, ids), _logits(pm, ids), TOL, "PEFT -> ours")


def test_peft_suffix_modules_to_save_norm_loads(tmp_path):
    """PEFT's modules_to_save=["norm"] on Llama wraps model.norm and every *_layernorm; all of them load here."""
    torch.manual_seed(0)
    base = _llama()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, ["q_proj"], modules_to_save=["norm"])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    assert fresh.model.layers[0].input_layernorm.weight.requires_grad and fresh.model.norm.weight.requires_grad
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, "norm modules_to_save")


def test_all_linear_leaves_a_nested_classification_head_alone_as_peft(tmp_path):
    """RoBERTa's head holds Linears (classifier.dense, .out_proj): "all-linear" leaves the whole head out, as PEFT
    with SEQ_CLS does; the adapter (head saved whole) loads in PEFT with the same logits."""
    torch.manual_seed(0)
    base = _roberta_cls()
    fresh = copy.deepcopy(base)
    ours = apply_lora(copy.deepcopy(base), "all-linear", rank=2)
    assert not [n for n in lora_layers(ours) if n.startswith("classifier")] and len(lora_layers(ours)) == 12
    _randomise_lora(ours)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(fresh, tmp_path).eval()
    ids = _ids()
    assert_rel_close(_logits(theirs, ids), _logits(ours, ids), TOL, "RoBERTa all-linear")


@pytest.mark.parametrize("targets", [["query", "value", "dense"], ["query", "classifier"]],
                         ids=["inside-head", "head-itself"])
def test_lora_inside_a_seq_cls_head_is_refused_at_save(tmp_path, targets):
    """PEFT saves a SEQ_CLS head whole and cannot hold LoRA weights inside it: save_adapter says so and writes
    nothing (it wrote a file neither library could load)."""
    model = _roberta_cls() if "dense" in targets else _distilbert_cls()
    if "classifier" in targets:
        targets = ["q_lin", "classifier"]
    apply_lora(model, targets, rank=2)
    with pytest.raises(ValueError, match="inside a module PEFT saves whole"):
        save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_layers_pattern_means_any_layer(tmp_path):
    """PEFT treats layers_pattern "" like None (any numbered segment); so does load_adapter."""
    torch.manual_seed(0)
    base = _llama()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, ["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="")
    pm.save_pretrained(tmp_path)
    assert load_adapter(fresh, tmp_path) == AdapterLoadResult([], [])
    assert sorted(lora_layers(fresh)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    ids = _ids()
    assert_rel_close(_logits(fresh, ids), _logits(pm, ids), TOL, "layers_pattern ''")


def _bert_token_cls(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=VOCAB, max_position_embeddings=16, num_labels=3)
    return transformers.BertForTokenClassification(cfg).eval()


def _t5(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, vocab_size=VOCAB,
                                decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def test_a_modules_to_save_module_shared_under_other_names_gets_a_copy_as_in_peft(tmp_path):
    """T5's ``shared`` in modules_to_save: on transformers 4 encoder/decoder.embed_tokens are the same module, and
    lora_fast trained it in place — the embeddings the forward reads — while its warning (and PEFT, whose wrapper
    holds a copy) said ``shared`` got weights of its own; the adapter then gave other logits in PEFT. Now the
    name gets a copy on every transformers version: a training step leaves the encoder's embeddings alone, and the
    saved adapter computes in PEFT what it computed here."""
    _t5().save_pretrained(tmp_path / "base")
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match=r"modules_to_save shared.* now have their own weights") as caught:
        apply_lora(model, ["q", "v"], rank=4, alpha=8, modules_to_save=["shared"])
    if transformers_major() < 5:  # one module under three names: the warning says what the forward reads
        assert any("T5's encoder and decoder read embed_tokens" in str(w.message) for w in caught)
    _randomise_lora(model)
    assert model.shared is not model.encoder.embed_tokens
    assert model.shared.weight is not model.encoder.embed_tokens.weight
    encoder_embeddings = model.encoder.embed_tokens.weight.detach().clone()
    ids = _ids()
    kw = {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(input_ids=ids, labels=ids[:, :3].contiguous()).loss.backward()
    opt.step()
    assert torch.equal(model.encoder.embed_tokens.weight, encoder_embeddings)
    model.eval()
    save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        ref = model(**kw).logits
        pm = PeftModel.from_pretrained(transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                       tmp_path / "a").eval()
        assert_rel_close(pm(**kw).logits, ref, TOL, "PEFT, modules_to_save shared")
        fresh = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base")
        with pytest.warns(UserWarning, match="modules_to_save shared"):
            load_adapter(fresh, tmp_path / "a")
        assert_rel_close(fresh.eval()(**kw).logits, ref, TOL, "load_adapter, modules_to_save shared")


def test_an_adapter_without_a_task_type_names_its_class_for_auto_peft_model_and_merge(tmp_path):
    """A ViT image classifier has no PEFT task type: the adapter records the base class in ``auto_mapping`` as PEFT
    does, so ``AutoPeftModel`` can rebuild it (it raised "Cannot infer the auto class from the config"), and
    ``lora-fast merge`` loads the base with that class even when the base's config lists no architecture."""
    from peft import AutoPeftModel

    from lora_fast.cli import main as cli_main

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_hidden_layers=2, hidden_size=32,
                                 intermediate_size=48, num_attention_heads=2, num_labels=3)
    base = transformers.ViTForImageClassification(cfg).eval()
    base.config.architectures = None  # the merge must not need it
    base.save_pretrained(tmp_path / "base")
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "base").eval()
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = ["query", "value"] if "query" in linear else ["q_proj", "v_proj"]  # transformers 4 / 5 names
    apply_lora(model, targets, rank=4, alpha=8, modules_to_save=["classifier"])
    _randomise_lora(model)
    save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["task_type"] is None
    assert saved["auto_mapping"] == {"base_model_class": "ViTForImageClassification",
                                     "parent_library": type(model).__module__}
    from torch.distributed.fsdp import FSDPModule

    sharded_like = copy.copy(model)  # fully_shard swaps in a generated subclass FSDP<Name> (defined in torch)
    sharded_like.__class__ = type(f"FSDP{type(model).__name__}", (FSDPModule, type(model)), {})
    save_adapter(sharded_like, tmp_path / "fsdp")
    assert json.loads((tmp_path / "fsdp" / "adapter_config.json").read_text())["auto_mapping"] == saved["auto_mapping"]
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=pixels).logits
        pm = AutoPeftModel.from_pretrained(tmp_path / "a").eval()
        assert_rel_close(pm(pixel_values=pixels).logits, ref, TOL, "AutoPeftModel, no task type")
    assert cli_main(["merge", "--adapter", str(tmp_path / "a"), "--output", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert type(merged).__name__ == "ViTForImageClassification"
    with torch.no_grad():
        assert_rel_close(merged(pixel_values=pixels).logits, ref, TOL, "merged, no task type")


@pytest.mark.parametrize("task", ["TOKEN_CLS", "SEQ_2_SEQ_LM"])
def test_task_types_travel_and_merge(task, tmp_path):
    """A token-classification (BERT) or seq2seq (T5) adapter is saved with PEFT's task type — the token head whole
    in modules_to_save, as PEFT does — so AutoPeftModel picks the right class; `lora-fast merge` loads the base with
    that class (it used to try AutoModelForCausalLM) and the merged model gives PEFT's outputs."""
    from peft import AutoPeftModelForSeq2SeqLM, AutoPeftModelForTokenClassification

    from lora_fast.cli import main as cli_main

    make, auto_peft, auto = ((_bert_token_cls, AutoPeftModelForTokenClassification,
                              transformers.AutoModelForTokenClassification) if task == "TOKEN_CLS" else
                             (_t5, AutoPeftModelForSeq2SeqLM, transformers.AutoModelForSeq2SeqLM))
    make().save_pretrained(tmp_path / "base")
    model = auto.from_pretrained(tmp_path / "base").eval()
    targets = ["query", "value"] if task == "TOKEN_CLS" else ["q", "v"]
    apply_lora(model, targets, rank=4, alpha=8, modules_to_save=["classifier"] if task == "TOKEN_CLS" else None)
    _randomise_lora(model)
    if task == "TOKEN_CLS":
        with torch.no_grad():
            model.classifier.weight.add_(0.5)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == task
    ids = _ids()
    kw = {"input_ids": ids} if task == "TOKEN_CLS" else {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    with torch.no_grad():
        ref = model(**kw).logits
        pm = auto_peft.from_pretrained(tmp_path / "a").eval()
        assert_rel_close(pm(**kw).logits, ref, TOL, f"{task}: AutoPeftModel")
    assert cli_main(["merge", "--adapter", str(tmp_path / "a"), "--output", str(tmp_path / "m")]) == 0
    with torch.no_grad():
        assert_rel_close(auto.from_pretrained(tmp_path / "m").eval()(**kw).logits, ref, TOL, f"{task}: merged")
    # PEFT's file back into lora_fast and out again: the task type (and the head) are kept
    pm.save_pretrained(tmp_path / "b")
    fresh = auto.from_pretrained(tmp_path / "base").eval()
    assert load_adapter(fresh, tmp_path / "b") == AdapterLoadResult([], [])
    save_adapter(fresh, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["task_type"] == task
    with torch.no_grad():
        assert_rel_close(fresh(**kw).logits, ref, TOL, f"{task}: PEFT's file in lora_fast")


def test_save_refuses_an_unknown_task_type(tmp_path):
    model = apply_lora(_gpt2(), ["c_attn"], rank=2)
    for bad in ("causal_lm", "FOO"):
        with pytest.raises(ValueError, match=f"task_type '{bad}' is not one of PEFT's"):
            save_adapter(model, tmp_path / "a", task_type=bad)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("bad", ["causal_lm", 5, "", "CAUSAL-LM"])
def test_a_task_type_peft_refuses_is_refused_on_load_and_never_saved_again(saved, tmp_path, bad):
    """adapter_config.json's task_type is kept by load_adapter and written back by save_adapter. A value PEFT refuses
    ("Invalid task type") was accepted on load and saved again, skipping the check an explicit save_adapter(task_type=)
    gets, into a directory PEFT cannot load. It is refused on load, naming the field and the file, as PEFT refuses
    it; PEFT's own task types (and null) load."""
    from peft import TaskType
    from lora_fast.adapter_config import TASK_TYPES

    assert set(TASK_TYPES) == {t.value for t in TaskType}  # the list checked is PEFT's
    directory, fresh, model = saved
    cfg_path = directory / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "task_type": bad}))
    with pytest.raises(ValueError, match="Invalid task type"):
        PeftModel.from_pretrained(copy.deepcopy(fresh), directory)
    with pytest.raises(ValueError, match=rf"load_adapter: {re.escape(str(cfg_path))}: task_type {re.escape(repr(bad))} "
                                         "is not one of PEFT's"):
        load_adapter(fresh, directory)
    assert not lora_layers(fresh)
    ids = _ids()
    for good in (None, "CAUSAL_LM"):
        cfg_path.write_text(json.dumps({**cfg, "task_type": good}))
        loaded = copy.deepcopy(fresh)
        assert load_adapter(loaded, directory) == AdapterLoadResult([], [])
        save_adapter(loaded, tmp_path / str(good))
        theirs = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / str(good)).eval()
        assert theirs.peft_config["default"].task_type == "CAUSAL_LM"  # None: inferred from the class on save
        assert_rel_close(_logits(theirs, ids), _logits(model, ids), TOL, f"task_type {good} saved again, in PEFT")


def test_save_refuses_an_invalid_recorded_task_type(tmp_path):
    """The task type recorded in model.lora_fast_config (kept from the loaded adapter; here set as an earlier
    lora_fast, which did not check it on load, left it) is checked like an explicit one before anything is written."""
    model = apply_lora(_gpt2(), ["c_attn"], rank=2)
    model.lora_fast_config["task_type"] = "causal_lm"
    with pytest.raises(ValueError, match=r"save_adapter: the model's recorded task_type 'causal_lm' "
                                         r"\(model.lora_fast_config.*pass task_type="):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    save_adapter(model, tmp_path / "a", task_type="CAUSAL_LM")  # an explicit valid one is taken instead
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_task_type_is_inferred_only_where_peft_can_run_it(tmp_path):
    """Inference stays conservative: a token-classification model whose head holds LoRA ("all-linear") is saved
    without a task type (the head would otherwise have to travel whole, and the save was refused), and so is a bare
    BertModel (PEFT's FeatureExtraction class refuses many models' signatures; its generic PeftModel runs any).
    `lora-fast merge` then loads the base as the class its config.json names."""
    from peft import PeftModel

    from lora_fast.cli import main as cli_main

    model = apply_lora(_bert_token_cls(), "all-linear", rank=2)
    _randomise_lora(model)
    save_adapter(model, tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "adapter_config.json").read_text())["task_type"] is None
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        pm = PeftModel.from_pretrained(_bert_token_cls(), tmp_path / "tok").eval()
        assert_rel_close(pm(input_ids=ids).logits, ref, TOL, "PEFT loading an all-linear token classifier")

    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=48, vocab_size=VOCAB,
                                                          max_position_embeddings=16)).eval()
    bert.save_pretrained(tmp_path / "base")
    model = apply_lora(transformers.BertModel.from_pretrained(tmp_path / "base").eval(), ["query", "value"], rank=2)
    _randomise_lora(model)
    save_adapter(model, tmp_path / "feat")
    assert json.loads((tmp_path / "feat" / "adapter_config.json").read_text())["task_type"] is None
    assert cli_main(["merge", "--adapter", str(tmp_path / "feat"), "--output", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModel.from_pretrained(tmp_path / "m").eval()
    assert type(merged).__name__ == "BertModel"
    with torch.no_grad():
        assert_rel_close(merged(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state, TOL,
                         "merged BertModel")


def test_wrapped_models_save_and_load_the_wrapped_models_keys(tmp_path):
    """``torch.compile`` and DDP/DataParallel wrappers are unwrapped: the file of a wrapped model is the plain
    model's (no ``_orig_mod.``/``module.`` in the keys, the task type of the model inside), PEFT loads it with equal
    logits, and an adapter loads into a wrapped model. A prefixed file would load in PEFT with only a warning,
    leaving its adapter at zero."""
    model, fresh = _lora_fast_model("gpt2")
    ids = _ids()
    ref = _logits(model, ids)
    save_adapter(model, tmp_path / "plain")
    plain_keys = sorted(load_file(tmp_path / "plain" / "adapter_model.safetensors"))
    plain_cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert plain_cfg["task_type"] == "CAUSAL_LM"
    for name, wrapped in (("compiled", torch.compile(model)), ("dp", torch.nn.DataParallel(model)),
                          ("both", torch.compile(torch.nn.DataParallel(model)))):
        save_adapter(wrapped, tmp_path / name)
        assert sorted(load_file(tmp_path / name / "adapter_model.safetensors")) == plain_keys, name
        assert json.loads((tmp_path / name / "adapter_config.json").read_text()) == plain_cfg, name
    pm = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "compiled").eval()
    assert_rel_close(_logits(pm, ids), ref, TOL, "PEFT loading a compiled model's adapter")
    target = copy.deepcopy(fresh)
    assert load_adapter(torch.compile(target), tmp_path / "plain") == AdapterLoadResult([], [])
    assert_rel_close(_logits(target, ids), ref, TOL, "loaded through a compile wrapper")


def test_frozen_load_switches_dropout_off_as_peft_does(tmp_path):
    """``is_trainable=False`` is for inference: the model goes to eval mode (PEFT's from_pretrained does the
    same), so an adapter saved with lora_dropout gives deterministic outputs equal to PEFT's."""
    build, targets, _, _ = MODELS["gpt2"]
    base = build()
    pm = _peft_model(copy.deepcopy(base), targets, lora_dropout=0.5)
    pm.save_pretrained(tmp_path)
    ids = _ids()
    ref = _logits(pm, ids)
    ours = copy.deepcopy(base).train()  # as after a training loop, or a model built from a config
    load_adapter(ours, tmp_path, is_trainable=False)
    assert not any(m.training for m in ours.modules())
    assert_rel_close(_logits(ours, ids), ref, TOL, "frozen load")
    trainable = copy.deepcopy(base).train()
    load_adapter(trainable, tmp_path)  # is_trainable=True leaves the mode alone (training goes on)
    assert trainable.training


def test_a_second_load_sets_what_is_trainable_again(tmp_path):
    """A model whose LoRA layers came from an ``is_trainable=False`` load (evaluate a checkpoint first), loaded
    again with ``is_trainable=True`` (go on training from it): the LoRA weights are trainable again, not only the
    ``modules_to_save`` (the optimizer then trained the head alone, silently); and the reverse freezes them."""
    model, fresh = _lora_fast_model("gpt2")
    save_adapter(model, tmp_path)
    load_adapter(fresh, tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in fresh.parameters())
    load_adapter(fresh, tmp_path, is_trainable=True)
    lora_params = {n for n, _ in fresh.named_parameters() if ".lora.lora_" in n}
    assert lora_params and {n for n, p in fresh.named_parameters() if p.requires_grad} == lora_params
    load_adapter(fresh, tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_an_adapter_of_other_modules_into_existing_layers_says_why(tmp_path):
    """Existing LoRA layers take the loaded weights whatever the adapter's target_modules: an adapter of other
    modules then does not fit, and the error says that, and how to load it (unload first), beside the keys."""
    build, _, _, _ = MODELS["gpt2"]
    for targets in (["c_attn"], ["c_fc"]):
        model = apply_lora(build(), targets, rank=4)
        save_adapter(model, tmp_path / targets[0])
    model = build()
    load_adapter(model, tmp_path / "c_attn")
    with pytest.raises(ValueError, match=r"Unexpected .*c_fc.*already has LoRA layers \(transformer\.h\.0\.attn\."
                                         r"c_attn.*target_modules \(\['c_fc'\]\).*lora_fast\.unload\(model\)"):
        load_adapter(model, tmp_path / "c_fc")
    lora_fast.unload(model)
    load_adapter(model, tmp_path / "c_fc")
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(model)} == {"c_fc"}

def test_a_named_peft_adapter_directory_is_pointed_to(tmp_path):
    """PEFT saves an adapter named other than "default" in a subdirectory of that name: the error on the parent
    names the subdirectories to load, and the subdirectory loads."""
    build, targets, _, _ = MODELS["gpt2"]
    base = build()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, init_lora_weights=False),
                        adapter_name="mine")
    pm.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds adapter directories: mine; PEFT saves an adapter named"):
        load_adapter(copy.deepcopy(base), tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "mine")
    ids = _ids()
    assert_rel_close(_logits(ours, ids), _logits(pm, ids), TOL, "the named adapter's directory")

def test_full_model_checkpoint_is_named_as_such(tmp_path):
    """A Trainer.save_model / save_pretrained folder of a LoRA-injected model holds no adapter file: the error says
    what it holds and how to write an adapter, instead of only that the adapter file is missing."""
    model, fresh = _lora_fast_model("gpt2")
    save_file({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"full model's weights.*lora_fast\.save_adapter"):
        load_adapter(fresh, tmp_path)


def test_load_into_a_quantised_base_names_the_module(tmp_path):
    """A target whose base is quantised (int8 weight) is refused naming that module, before anything is changed."""
    save_adapter(apply_lora(_llama(), ["q_proj", "v_proj"], rank=4), tmp_path)
    fresh = _llama()
    v = fresh.model.layers[1].self_attn.v_proj
    v.weight = torch.nn.Parameter(v.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"load_adapter: model.layers.1.self_attn.v_proj: .*int8"):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh)


def test_resized_vocabulary_of_a_hub_base(tmp_path, monkeypatch):
    """A hub-named base (no local directory): its config comes from the Hugging Face cache (never downloaded), and a
    resized vocabulary saves the embeddings as for a local base; a base whose config is nowhere here cannot be
    checked: the embeddings are not saved, and a warning says so (it was silent)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--llama" / "snapshots" / "abc"
    _llama().config.save_pretrained(snapshot)  # what from_pretrained("tiny/llama") would have cached
    (cache / "models--tiny--llama" / "refs").mkdir()
    (cache / "models--tiny--llama" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(cache), raising=False)  # 4.x's copy
    for name, saved in (("tiny/llama", True), ("tiny/elsewhere", False)):
        model = _llama()
        model.resize_token_embeddings(VOCAB + 4)
        apply_lora(model, ["q_proj"], rank=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            save_adapter(model, tmp_path / name, base_model_name_or_path=name)
        unread = [str(w.message) for w in caught if "could not read the config" in str(w.message)]
        want = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} if saved else set()
        assert set(_non_lora(tmp_path / name)) == want, name
        assert bool(unread) != saved and all(f"base model {name!r}" in m for m in unread), unread


def test_adapter_paths_that_are_no_directory_are_named(tmp_path):
    """save_adapter into a file (or below one) names it before any work; load_adapter of a hub-like name that is no
    local directory says adapters load from a local directory, and how to get one."""
    model = apply_lora(_llama(), ["q_proj"], rank=4)
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(NotADirectoryError, match=rf"save_adapter: '{tmp_path / 'file'}' is a file"):
            save_adapter(model, target)
    assert (tmp_path / "file").read_text() == "x"
    with pytest.raises(FileNotFoundError, match=r"'org/adapter' is not a directory; .*not the Hugging Face hub.*"
                                                r"snapshot_download"):
        load_adapter(_llama(), "org/adapter")
    with pytest.raises(FileNotFoundError, match=r"is not a directory$"):
        load_adapter(_llama(), tmp_path / "file")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_generate_with_a_loaded_adapter_is_pefts(tmp_path, backend, monkeypatch):
    """The usual use after training: ``generate`` (KV cache, a few tokens per step, eval mode, no grad: the fused
    forward without autograd) with a PEFT adapter loaded into lora_fast layers gives PEFT's tokens, greedy and
    sampled under one seed, and so does the merged model; the logits of the generated sequence agree."""
    device = "cpu"
    if backend == "triton":
        interpreted = pytest.importorskip("tests.triton_interpret", reason="triton missing: the fused path is tested "
                                          "where triton is installed (CI, GPU)")
        device = interpreted.DEVICE
        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")  # for this test: the kernels run in triton's interpreter
    base = _gpt2().to(device)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                        init_lora_weights=False, fan_in_fan_out=True)).eval()
    pm.save_pretrained(tmp_path / "a")
    ids = torch.randint(1, VOCAB, (2, 5), device=device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=0)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "a", backend=backend, is_trainable=False)
    want = pm.generate(input_ids=ids, do_sample=False, **kw)
    assert torch.equal(model.generate(input_ids=ids, do_sample=False, **kw), want)
    torch.manual_seed(1)
    sampled = pm.generate(input_ids=ids, do_sample=True, **kw)
    torch.manual_seed(1)
    assert torch.equal(model.generate(input_ids=ids, do_sample=True, **kw), sampled)
    with torch.no_grad():
        assert_rel_close(model(input_ids=want).logits, pm(input_ids=want).logits.double(), TOL, "logits")
    merged = lora_fast.merge_and_unload(model)
    assert torch.equal(merged.generate(input_ids=ids, do_sample=False, **kw), want)
