"""PEFT parity across transformers architectures, as a PEFT user would port their work: tiny models (hidden 32, two
layers, vocabulary 64, built from their configs on CPU, fp32) of every family PEFT has a default for, compared with
PEFT on the same weights —

    target_modules=None      the same modules as PEFT's default for the model type;
    "all-linear"             the same modules as PEFT's all-linear (causal/seq2seq LM, masked LM, SEQ_CLS + head);
    forward and backward     the same logits and the same gradient of every trainable parameter (A/B copied from PEFT,
                             B non-zero so the LoRA term matters, dropout 0);
    adapter files            save_adapter → PeftModel.from_pretrained, PEFT's save_pretrained → load_adapter, and
                             merge_and_unload, all giving PEFT's logits;
    patterns                 rank_pattern / alpha_pattern / use_rslora / a SEQ_CLS head on a few architectures.

Architectures missing from the installed transformers are skipped with a reason. Known divergences are asserted as
such: PEFT has no default for DistilBERT (lora_fast's own), and on transformers v5 Mixtral-style MoE models PEFT's
"all-linear" also adapts the fused experts and the router (``target_parameters``), which lora_fast cannot wrap and
names in a warning.
"""

# ruff: noqa: I001  (tests.triton_interpret is imported first, see test_adapter.py)
from __future__ import annotations

try:  # before peft, which imports triton: triton must first be imported under the interpreter on CPU
    import tests.triton_interpret  # noqa: F401
except ImportError:  # triton missing
    pass

import copy
import warnings

import pytest
import torch

from lora_fast import apply_lora, find_target_modules, load_adapter, lora_layers, merge_and_unload, save_adapter
from lora_fast.adapter import AdapterLoadResult
from tests.utils import MISSING, assert_rel_close, rel_err

peft = pytest.importorskip("peft", reason=MISSING["peft"])
transformers = pytest.importorskip("transformers", reason=MISSING["transformers"])
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: a thread pool spins more than it computes

TOL = 1e-6  # fp32 on both sides, the same products (both libraries compute W₀x + s·B(Ax)): summation order at most
VOCAB, HIDDEN, LAYERS, SEQ, BATCH = 64, 32, 2, 8, 2  # tiny: every architecture builds and runs in milliseconds
PREFIX = "base_model.model."

_DEC = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
_ENC = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0)
_ROBERTA = {**_ENC, "pad_token_id": 1}  # RoBERTa's positions start after its padding index
_BART = dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
             vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
_T5 = dict(d_model=HIDDEN, d_ff=64, d_kv=8, num_layers=LAYERS, num_heads=4, vocab_size=VOCAB, pad_token_id=0,
           eos_token_id=2, decoder_start_token_id=0)
_GPT = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=32, vocab_size=VOCAB, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
_MOE = dict(_DEC, num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# model_type: (config class, config kwargs, LM class, SEQ_CLS class or None). "LM" is the causal LM, the seq2seq LM
# (BART, T5) or, for encoders, the masked LM.
ARCHS = {
    "gpt2": ("GPT2Config", _GPT, "GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "llama": ("LlamaConfig", _DEC, "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralConfig", _DEC, "MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2Config", _DEC, "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3Config", {**_DEC, "head_dim": 8}, "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma": ("GemmaConfig", {**_DEC, "head_dim": 8}, "GemmaForCausalLM", "GemmaForSequenceClassification"),
    "gemma2": ("Gemma2Config", {**_DEC, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4},
               "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3TextConfig", {**_DEC, "head_dim": 8, "sliding_window": 4}, "Gemma3ForCausalLM",
                    "Gemma3TextForSequenceClassification"),
    "phi": ("PhiConfig", _DEC, "PhiForCausalLM", "PhiForSequenceClassification"),
    "gpt_neox": ("GPTNeoXConfig", {k: v for k, v in _DEC.items() if k != "num_key_value_heads"},
                 "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification"),
    "gptj": ("GPTJConfig", {**_GPT, "rotary_dim": 4}, "GPTJForCausalLM", "GPTJForSequenceClassification"),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=4, window_size=4,
                                     attention_types=[[["global", "local"], 1]], max_position_embeddings=32,
                                     vocab_size=VOCAB, pad_token_id=0),
                "GPTNeoForCausalLM", "GPTNeoForSequenceClassification"),
    "opt": ("OPTConfig", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=64, num_attention_heads=4,
                              word_embed_proj_dim=HIDDEN, max_position_embeddings=32, vocab_size=VOCAB,
                              pad_token_id=0),
            "OPTForCausalLM", "OPTForSequenceClassification"),
    "bloom": ("BloomConfig", dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, pad_token_id=0),
              "BloomForCausalLM", "BloomForSequenceClassification"),
    "falcon": ("FalconConfig", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                    vocab_size=VOCAB, pad_token_id=0),
               "FalconForCausalLM", "FalconForSequenceClassification"),
    "gpt_bigcode": ("GPTBigCodeConfig", _GPT, "GPTBigCodeForCausalLM", "GPTBigCodeForSequenceClassification"),
    "codegen": ("CodeGenConfig", {**_GPT, "rotary_dim": 4, "n_ctx": 32}, "CodeGenForCausalLM", None),
    "mpt": ("MptConfig", dict(d_model=HIDDEN, n_heads=4, n_layers=LAYERS, expansion_ratio=2, max_seq_len=32,
                              vocab_size=VOCAB, pad_token_id=0),
            "MptForCausalLM", "MptForSequenceClassification"),
    "stablelm": ("StableLmConfig", _DEC, "StableLmForCausalLM", "StableLmForSequenceClassification"),
    "mixtral": ("MixtralConfig", _MOE, "MixtralForCausalLM", "MixtralForSequenceClassification"),
    "bart": ("BartConfig", _BART, "BartForConditionalGeneration", "BartForSequenceClassification"),
    "t5": ("T5Config", _T5, "T5ForConditionalGeneration", "T5ForSequenceClassification"),
    "bert": ("BertConfig", _ENC, "BertForMaskedLM", "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", _ROBERTA, "RobertaForMaskedLM", "RobertaForSequenceClassification"),
    "xlm-roberta": ("XLMRobertaConfig", _ROBERTA, "XLMRobertaForMaskedLM", "XLMRobertaForSequenceClassification"),
    "distilbert": ("DistilBertConfig", dict(dim=HIDDEN, n_layers=LAYERS, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                                            max_position_embeddings=32, pad_token_id=0),
                   "DistilBertForMaskedLM", "DistilBertForSequenceClassification"),
    "deberta-v2": ("DebertaV2Config", _ENC, "DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification"),
    "deberta": ("DebertaConfig", _ENC, "DebertaForMaskedLM", "DebertaForSequenceClassification"),
    "electra": ("ElectraConfig", {**_ENC, "embedding_size": HIDDEN}, "ElectraForMaskedLM",
                "ElectraForSequenceClassification"),
}
SEQ2SEQ = {"bart", "t5"}
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "deberta", "electra"}
# transformers v5 MoE: experts are fused 3-D parameters and the router a custom module, which PEFT's "all-linear"
# adapts through target_parameters and lora_fast cannot wrap (test_all_linear_names_what_it_cannot_wrap)
MOE = {"mixtral"}
NO_PEFT_DEFAULT = {"distilbert"}  # PEFT's table has no entry; lora_fast's default is its own


def _build(arch: str, kind: str):
    """A tiny, seeded, eval-mode model of ``arch``: ``kind`` "lm" or "cls" (SEQ_CLS, 3 labels)."""
    cfg_name, kw, lm_name, cls_name = ARCHS[arch]
    cls_name = lm_name if kind == "lm" else cls_name
    missing = [n for n in (cfg_name, cls_name) if n is None or not hasattr(transformers, n)]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} has no {missing[0] or f'{arch} {kind} class'}")
    cfg = getattr(transformers, cfg_name)(**kw)
    if kind == "cls":
        cfg.num_labels = 3
    torch.manual_seed(0)
    with warnings.catch_warnings():  # transformers' notes about the tiny configs
        warnings.simplefilter("ignore")
        return getattr(transformers, cls_name)(cfg).eval()


def _task(arch: str, kind: str) -> str | None:
    if kind == "cls":
        return "SEQ_CLS"
    return "SEQ_2_SEQ_LM" if arch in SEQ2SEQ else None if arch in ENCODERS else "CAUSAL_LM"


def _inputs(arch: str, kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)  # no pad/bos/eos inside
    ids[:, -1] = 2  # one eos at the end: BART/T5 classification pool it
    kw = {"input_ids": ids}
    if arch in SEQ2SEQ and kind == "lm":
        kw["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    return kw


def _quiet(fn):
    with warnings.catch_warnings():  # PEFT's and lora_fast's notes (Conv1D fan_in_fan_out, frozen heads, ...)
        warnings.simplefilter("ignore")
        return fn()


def _peft(base, targets, task, **kw):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, lora_dropout=0.0, **kw)
    return _quiet(lambda: get_peft_model(base, cfg)).eval()


def _peft_layers(pm) -> dict:
    """{module name in the base model: PEFT LoRA layer} (modules_to_save wrappers are not LoRA layers)."""
    return {n.removeprefix(PREFIX): m for n, m in pm.named_modules()
            if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_A")}


def _heads(model) -> list[str] | None:
    """What PEFT's SEQ_CLS adds to modules_to_save, as a lora_fast user names it."""
    return [h for h in ("classifier", "score") if hasattr(model, h)] or None


def _ours(base, targets, kind, **kw):
    kw.setdefault("modules_to_save", _heads(base) if kind == "cls" else None)
    return _quiet(lambda: apply_lora(copy.deepcopy(base), targets, rank=4, alpha=8, **kw))


def _randomise_lora(model) -> None:
    """Random A and B (B is zero at init) in a PEFT or a lora_fast model, so that the adapter changes the output."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _copy_lora(pm, ours) -> None:
    """PEFT's A and B into lora_fast's layers (the heads start equal: both are the base model's)."""
    params = {n.removeprefix(PREFIX): p for n, p in pm.named_parameters()}
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora.lora_A.copy_(params[f"{name}.lora_A.default.weight"])
            layer.lora.lora_B.copy_(params[f"{name}.lora_B.default.weight"])


def _peft_grad_names(name: str) -> str:
    """A PEFT parameter name as lora_fast names the same tensor."""
    name = name.removeprefix(PREFIX).replace(".modules_to_save.default.", ".")
    for ab in "AB":
        name = name.replace(f".lora_{ab}.default.weight", f".lora.lora_{ab}")
    return name


def _logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def _check_forward_and_grads(pm, ours, kw, what: str) -> None:
    """Same logits and, for a random linear loss, the same gradient of every trainable parameter."""
    out_p, out_o = pm(**kw).logits, ours(**kw).logits
    assert_rel_close(out_o, out_p, TOL, f"{what}: logits")
    w = torch.randn(out_p.shape, generator=torch.Generator().manual_seed(3))
    (out_p * w).sum().backward()
    (out_o * w).sum().backward()
    theirs = {_peft_grad_names(n): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs), f"{what}: trainable parameters differ"
    for n, g in mine.items():
        assert g is not None and theirs[n] is not None, f"{what}: {n} got no gradient"
        assert_rel_close(g, theirs[n], TOL, f"{what}: grad {n}")


# SEQ_CLS runs: every encoder (the task they are fine-tuned for), BART/T5 (a classification_head PEFT does not save
# whole) and two decoders' score heads (Conv1D GPT-2, Linear Llama); every decoder's passes too, at twice the time.
CLS_ARCHS = ENCODERS | SEQ2SEQ | {"gpt2", "llama"}


def _cases():
    return [pytest.param(a, k, id=f"{a}-{k}") for a in ARCHS for k in ("lm", "cls") if k == "lm" or a in CLS_ARCHS]


# ------------------------------------------------------------------------------------------------- target modules
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_default_targets_are_peft_defaults(arch):
    base = _build(arch, "lm")
    if arch in NO_PEFT_DEFAULT:  # lora_fast's own default; PEFT asks for target_modules
        with pytest.raises(ValueError, match="target_modules"):
            _peft(copy.deepcopy(base), None, _task(arch, "lm"))
        assert find_target_modules(base)
        return
    # PEFT 0.21 under transformers v5 raises NoMatchingPeftModuleError for Mixtral's target_modules=None (its MoE
    # config conversion): its table's entry for the model type is given instead
    targets = PEFT_DEFAULTS[base.config.model_type] if arch in MOE else None
    pm = _peft(copy.deepcopy(base), targets, _task(arch, "lm"))
    assert sorted(find_target_modules(base)) == sorted(_peft_layers(pm))
    assert sorted(lora_layers(_ours(base, None, "lm"))) == sorted(_peft_layers(pm))


@pytest.mark.parametrize("arch", sorted(MOE))
def test_all_linear_names_what_it_cannot_wrap(arch):
    """On transformers v5 MoE models PEFT's "all-linear" also adapts the fused experts (3-D parameters) and the
    router (``target_parameters``). lora_fast wraps nn.Linear/Conv1D only: it must say which modules it leaves
    out, so that every module PEFT adapts is either wrapped or named — never silently a smaller adapter."""
    base = _build(arch, "lm")
    pm = _peft(copy.deepcopy(base), "all-linear", "CAUSAL_LM")
    theirs = {n.removesuffix(".base_layer") for n in _peft_layers(pm)}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = apply_lora(copy.deepcopy(base), "all-linear", rank=4, alpha=8)
    wrapped = set(lora_layers(ours))
    left_out = theirs - wrapped
    if not left_out:
        pytest.skip(f"transformers {transformers.__version__} builds {arch}'s experts from nn.Linear: all-linear wraps "
                    "them as PEFT does")
    message = " ".join(str(w.message) for w in record if "all-linear" in str(w.message))
    assert message, f"{sorted(left_out)} are left out without a word"
    assert all(f"'{n}'" in message for n in left_out), (sorted(left_out), message)
    assert wrapped <= theirs


# ------------------------------------------------------------------------------------------ all-linear parity
def _parity_targets(arch):
    return ["q_proj", "k_proj", "v_proj", "o_proj"] if arch in MOE else "all-linear"


@pytest.mark.parametrize("arch, kind", _cases())
def test_all_linear_matches_peft(arch, kind, tmp_path):
    """One adapter, compared with PEFT's step by step: the modules "all-linear" wraps; logits and every gradient on
    the same weights; save_adapter → PeftModel.from_pretrained; PEFT's save_pretrained → load_adapter into a fresh
    base; merge_and_unload. (Mixtral: its attention projections; its experts are the test below's.)"""
    base = _build(arch, kind)
    targets, task, kw = _parity_targets(arch), _task(arch, kind), _inputs(arch, kind)
    if arch == "distilbert" and kind == "cls":  # SEQ_CLS's "classifier" also selects pre_classifier (a suffix)
        with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
            _peft(copy.deepcopy(base), targets, task)
        with pytest.raises(ValueError, match="pre_classifier"):  # refused alike, before anything changes
            _ours(base, targets, kind)
        return
    pm = _peft(copy.deepcopy(base), targets, task)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = apply_lora(copy.deepcopy(base), targets, rank=4, alpha=8,
                          modules_to_save=_heads(base) if kind == "cls" else None)
    assert not [w for w in record if "all-linear" in str(w.message)], "nothing is left out here"
    assert sorted(lora_layers(ours)) == sorted(_peft_layers(pm)), "the modules wrapped"

    _randomise_lora(pm)
    _copy_lora(pm, ours)
    assert rel_err(_logits(ours, kw), _logits(base, kw)) > 1e-3, "the LoRA term must change the output"
    _check_forward_and_grads(pm, ours, kw, f"{arch}-{kind}")
    want = _logits(pm, kw)

    save_adapter(ours, tmp_path / "ours")
    theirs = _quiet(lambda: PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")).eval()
    assert_rel_close(_logits(theirs, kw), want, TOL, "save_adapter -> PeftModel.from_pretrained")

    _quiet(lambda: pm.save_pretrained(tmp_path / "peft"))
    fresh = copy.deepcopy(base)
    assert _quiet(lambda: load_adapter(fresh, tmp_path / "peft")) == AdapterLoadResult([], [])
    assert_rel_close(_logits(fresh, kw), want, TOL, "PEFT save_pretrained -> load_adapter")

    merged_theirs = _quiet(pm.merge_and_unload)
    merged_ours = _quiet(lambda: merge_and_unload(ours))
    assert type(merged_ours) is type(base) and not lora_layers(merged_ours)
    assert_rel_close(_logits(merged_ours, kw), _logits(merged_theirs, kw), TOL, "merge_and_unload")


# -------------------------------------------------------------------------- rank/alpha patterns, rsLoRA, heads
PATTERNS = {
    # arch: (kind, targets, rank_pattern, alpha_pattern), in PEFT's syntax (suffix regexes)
    "llama": ("lm", "all-linear", {r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 6}, {"o_proj": 3, "up_proj": 5}),
    "bert": ("cls", ["query", "value", "dense"], {"attention.output.dense": 2}, {"value": 5}),
    "t5": ("lm", ["q", "v", "wo"], {"decoder.*wo": 2}, {"EncDecAttention.q": 4}),
    "gpt2": ("cls", ["c_attn", "c_fc"], {"h.1.attn.c_attn": 2}, {"c_fc": 7}),
}


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("arch", sorted(PATTERNS))
def test_patterns_rslora_and_heads_travel_both_ways(arch, use_rslora, tmp_path):
    """A PEFT adapter with per-module ranks and alphas (and rsLoRA, and a SEQ_CLS head trained whole) loads with
    PEFT's rank and scaling in every layer, computes PEFT's logits and gradients, and goes back to PEFT unchanged."""
    kind, targets, rank_pattern, alpha_pattern = PATTERNS[arch]
    base = _build(arch, kind)
    kw = _inputs(arch, kind)
    pm = _peft(copy.deepcopy(base), targets, _task(arch, kind), rank_pattern=rank_pattern,
               alpha_pattern=alpha_pattern, use_rslora=use_rslora)
    _randomise_lora(pm)
    if kind == "cls":  # a trained head: it must travel in the file, not come from the base
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ".modules_to_save.default." in n:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.5)
    _quiet(lambda: pm.save_pretrained(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    assert _quiet(lambda: load_adapter(ours, tmp_path / "peft")) == AdapterLoadResult([], [])

    peft_layers = _peft_layers(pm)
    assert sorted(lora_layers(ours)) == sorted(peft_layers)
    ranks = {n: m.rank for n, m in lora_layers(ours).items()}
    assert len(set(ranks.values())) > 1  # the pattern did select some layers
    for name, layer in lora_layers(ours).items():
        assert layer.rank == peft_layers[name].r["default"], name
        assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"], rel=1e-12), name
    _check_forward_and_grads(pm, ours, kw, f"{arch} patterns")

    save_adapter(ours, tmp_path / "ours")
    back = _quiet(lambda: PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")).eval()
    assert {n: m.r["default"] for n, m in _peft_layers(back).items()} == ranks
    assert_rel_close(_logits(back, kw), _logits(pm, kw), TOL, "round trip to PEFT")


@pytest.mark.parametrize("arch", ["llama", "roberta"])
def test_apply_lora_per_module_settings_load_in_peft(arch, tmp_path):
    """The other direction: ranks and alphas set per module by two apply_lora calls, rsLoRA and a SEQ_CLS head
    (modules_to_save, trained) are written so that PEFT builds the same layers and computes the same logits."""
    base = _build(arch, "cls")
    kw = _inputs(arch, "cls")
    first, second = (["q_proj", "v_proj"], ["down_proj"]) if arch == "llama" else (["query", "value"],
                                                                                   ["output.dense"])
    ours = apply_lora(copy.deepcopy(base), first, rank=4, alpha=8, use_rslora=True, modules_to_save=_heads(base))
    _quiet(lambda: apply_lora(ours, second, rank=2, alpha=3, use_rslora=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(ours, tmp_path)
    pm = _quiet(lambda: PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)).eval()
    theirs = _peft_layers(pm)
    assert sorted(theirs) == sorted(lora_layers(ours))
    for name, layer in lora_layers(ours).items():
        assert (theirs[name].r["default"], theirs[name].scaling["default"]) == (layer.rank, layer.scaling), name
    assert_rel_close(_logits(pm, kw), _logits(ours, kw), TOL, f"{arch}: lora_fast adapter in PEFT")


def test_a_later_call_cannot_wrap_inside_an_earlier_head(tmp_path):
    """A module trained whole by an earlier call (modules_to_save) cannot get a LoRA layer inside it from a later
    apply_lora, as it cannot in one call: the later call used to wrap ``classifier.dense`` and then make its base
    weight trainable with the rest of the head, leaving an adapter that save_adapter refused (and PEFT could not
    hold). Refused before anything changes; the adapter of the first call still saves and loads in PEFT."""
    base = _build("roberta", "cls")
    ours = apply_lora(copy.deepcopy(base), ["query"], rank=4, alpha=8, modules_to_save=["classifier"])
    before = sorted(lora_layers(ours))
    with pytest.raises(ValueError, match=r"earlier .*'classifier' \(LoRA target 'classifier.dense'\)"):
        apply_lora(ours, ["dense"], rank=2)
    assert sorted(lora_layers(ours)) == before
    assert not [n for n, p in ours.named_parameters() if p.requires_grad and ".linear." in n]
    _randomise_lora(ours)
    save_adapter(ours, tmp_path)
    kw = _inputs("roberta", "cls")
    pm = _quiet(lambda: PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)).eval()
    assert_rel_close(_logits(pm, kw), _logits(ours, kw), TOL, "the first call's adapter in PEFT")


def test_all_linear_leaves_out_routers_written_as_linear_subclasses():
    """Llama4's router is an nn.Linear subclass whose forward returns (scores, logits). "all-linear" wrapped it and
    the model's first forward failed (PEFT's all-linear fails there too); it is now left out and named in a warning,
    and the adapted model runs. Named in target_modules, it is still wrapped."""
    if not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Llama4 (4.51+; the main CI leg has it)")
    cfg = transformers.Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=64, intermediate_size_mlp=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, vocab_size=VOCAB, num_local_experts=2, max_position_embeddings=32,
                                        pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    routers = [n for n, m in model.named_modules() if type(m).__name__ == "Llama4Router"]
    assert len(routers) == LAYERS and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in routers)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply_lora(model, "all-linear", rank=4, alpha=8)
    message = " ".join(str(w.message) for w in record if "router" in str(w.message))
    assert all(f"'{n}'" in message for n in routers), message
    wrapped = lora_layers(model)
    assert not set(routers) & set(wrapped) and any(n.endswith("q_proj") for n in wrapped)
    ids = torch.randint(1, VOCAB, (2, 6))
    assert model(input_ids=ids).logits.shape == (2, 6, VOCAB)
    assert find_target_modules(transformers.Llama4ForCausalLM(cfg), ["router"]) == routers  # named: still chosen
