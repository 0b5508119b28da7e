"""patch_peft / unpatch_peft: PEFT models on lora_fast's path give PEFT's outputs and gradients, on the same tensors."""

# ruff: noqa: I001  (tests.triton_interpret is imported first, see below)
from __future__ import annotations

try:  # before peft, which imports triton: triton must first be imported under the interpreter on CPU
    from tests.triton_interpret import DEVICE as TRITON_DEVICE
    from tests.triton_interpret import HAS_CUDA
except ImportError:  # triton missing
    TRITON_DEVICE = HAS_CUDA = None

import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn

import lora_fast
from lora_fast import peft_compat
from lora_fast.layer import LinearWithLoRA
from lora_fast.peft_compat import is_patched, patch_peft, unpatch_peft
from tests.utils import assert_rel_close, rel_err, MISSING

peft = pytest.importorskip("peft", reason=MISSING["peft"])
transformers = pytest.importorskip("transformers", reason=MISSING["transformers"])
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5  # fp32: same products on both paths, only the summation order may differ
VOCAB = 97


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train mode stays deterministic
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


ARCHS = {"gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"]), "llama": (_llama, ["q_proj", "v_proj", "o_proj", "up_proj"])}


def _peft(arch, dropout=0.0, base=None, **kw):
    build, targets = ARCHS[arch]
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=kw.pop("target_modules", targets),
                     rank_pattern={"c_fc": 2, "up_proj": 2}, **kw)
    with warnings.catch_warnings():  # PEFT warns that it flips fan_in_fan_out for Conv1D targets
        warnings.simplefilter("ignore")
        pm = get_peft_model(build() if base is None else base, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)  # B is zero at init: make the adapter matter
    return pm


def _ids(batch=2, seq=7):
    return torch.randint(1, VOCAB, (batch, seq))


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls patched layers make into lora_fast."""
    calls = []
    real = peft_compat.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs["fan_in_fan_out"])
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_compat, "lora_linear", counting)
    return calls


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_outputs_and_gradients_equal_peft(arch, spy):
    pm = _peft(arch)
    ref_model = copy.deepcopy(pm)
    ids = _ids()
    params_before = {n: p for n, p in pm.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is supported: no warning at all
        assert patch_peft(pm) is pm
    n_layers = sum(is_patched(m) for m in pm.modules())
    assert n_layers == sum(isinstance(m, peft.tuners.lora.layer.Linear) for m in pm.modules()) >= 6
    assert {n: p for n, p in pm.named_parameters()} == params_before  # same Parameter objects: no copies

    pm.eval(), ref_model.eval()
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref_model(input_ids=ids).logits, TOL, f"{arch} eval logits")
    assert len(spy) == n_layers and all(spy) == (arch == "gpt2")  # Conv1D layers go as fan_in_fan_out
    pm.train(), ref_model.train()
    loss, grads = _loss_and_grads(pm, ids)
    ref_loss, ref_grads = _loss_and_grads(ref_model, ids)
    assert_rel_close(loss, ref_loss, TOL, "train loss")
    assert set(grads) == set(ref_grads) and len(grads) == 2 * n_layers
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], TOL, name)


def test_optimizer_keeps_working_across_patch():
    """An optimizer built before patching trains the patched model exactly like the unpatched one."""
    pm = _peft("gpt2").train()
    ref_model = copy.deepcopy(pm)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, ref_model)]
    patch_peft(pm)
    ids = _ids()
    b0 = pm.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight.detach().clone()
    for _ in range(3):
        for model, opt in zip((pm, ref_model), opts, strict=True):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    for (name, p), q in zip(pm.named_parameters(), ref_model.parameters(), strict=True):
        assert_rel_close(p, q, 1e-5, name)
    assert rel_err(pm.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight, b0) > 1e-4  # trained


def test_peft_layers_without_lora_bias_are_patched(spy):
    """PEFT < 0.14's LoRA layers have no ``lora_bias`` dict: patch_peft takes them (it used to raise on the attribute,
    after swapping the classes of the layers before it: a half-patched model) and computes what PEFT does."""
    pm = _peft("gpt2")
    layers = [m for m in pm.modules() if hasattr(m, "lora_bias") and hasattr(m, "lora_A")]
    assert layers
    for m in layers:
        del m.lora_bias
    ids = _ids()
    want_loss, want = _loss_and_grads(copy.deepcopy(pm), ids)
    patch_peft(pm)
    loss, got = _loss_and_grads(pm, ids)
    assert len(spy) > 0 and all(is_patched(m) for m in layers)
    assert_rel_close(loss, want_loss, 1e-6, "loss")
    for (name, g), w in zip(got.items(), want.values(), strict=True):
        assert_rel_close(g, w, 1e-5, name)


def test_dropout_goes_through_lora_fast():
    """Train mode with dropout: the patched PEFT layer is the lora_fast layer (same tensors, same RNG draws)."""
    pm = _peft("llama", dropout=0.25).train()
    patch_peft(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    ours = LinearWithLoRA(layer.base_layer, rank=4, alpha=8, dropout=0.25)
    ours.lora.lora_A, ours.lora.lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 32)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    assert torch.equal(y, ours(x))
    layer.eval()
    assert rel_err(y, layer(x)) > 1e-3  # dropout really acts in training mode
    ours.eval()
    assert torch.equal(layer(x), ours(x))


def test_merged_and_disabled_adapters_fall_back_to_peft(spy):
    pm = _peft("gpt2").eval()
    ref_model = copy.deepcopy(pm)
    patch_peft(pm)
    ids = _ids()
    with torch.no_grad():
        with pm.disable_adapter(), ref_model.disable_adapter():
            assert_rel_close(pm(input_ids=ids).logits, ref_model(input_ids=ids).logits, TOL, "disabled")
        assert not spy
        pm.merge_adapter(), ref_model.merge_adapter()
        assert_rel_close(pm(input_ids=ids).logits, ref_model(input_ids=ids).logits, TOL, "merged")
        assert not spy
        pm.unmerge_adapter(), ref_model.unmerge_adapter()
        assert_rel_close(pm(input_ids=ids).logits, ref_model(input_ids=ids).logits, TOL, "unmerged again")
    assert spy  # back on lora_fast's path


def test_unpatch_restores_peft_forward(spy):
    pm = _peft("llama").eval()
    patch_peft(pm)
    patch_peft(pm)  # twice is harmless: one wrapper, no warning
    ids = _ids()
    with torch.no_grad():
        patched = pm(input_ids=ids).logits
        calls = len(spy)
        assert calls == 8
        assert unpatch_peft(pm) is pm
        assert not any("forward" in m.__dict__ for m in pm.modules() if hasattr(m, "lora_A"))
        assert_rel_close(pm(input_ids=ids).logits, patched, TOL, "after unpatch")
    assert len(spy) == calls  # PEFT's own forward: lora_fast no longer called
    patch_peft(pm)  # patching again after unpatch_peft: lora_fast's path again, same numbers
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, patched, TOL, "patched again")
    assert len(spy) == 2 * calls and sum(is_patched(m) for m in pm.modules()) == calls


def test_mixed_batch_adapter_names_stays_on_peft(spy):
    """PEFT's mixed-batch call (``adapter_names``: one adapter per row) goes through PEFT's own forward on a patched
    layer, row by row as PEFT computes it — lora_fast's path would apply the active adapter to every row."""
    pm = _peft("gpt2").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name and ".other." in name:
                p.copy_(torch.randn_like(p) * 0.5)
    ref = copy.deepcopy(pm)
    ids, names = _ids(), ["default", "other"]
    patch_peft(pm)
    with torch.no_grad():
        mixed = pm(input_ids=ids, adapter_names=names).logits
        assert_rel_close(mixed, ref(input_ids=ids, adapter_names=names).logits, TOL, "mixed batch")
        assert not torch.allclose(mixed[1], pm(input_ids=ids).logits[1])  # row 1 really used the other adapter


def test_save_pretrained_after_patch(tmp_path):
    base = _gpt2()
    pm = _peft("gpt2", base=copy.deepcopy(base)).eval()
    patch_peft(pm)
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = copy.deepcopy(base).eval()
    lora_fast.load_adapter(ours, tmp_path)
    ids = _ids()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        assert_rel_close(loaded(input_ids=ids).logits, ref, TOL, "PEFT reloading what the patched model saved")
        assert_rel_close(ours(input_ids=ids).logits, ref, TOL, "lora_fast loading it")


@pytest.mark.parametrize("case", ["embedding", "dora", "lora_bias", "two_adapters"])
def test_unsupported_layers_stay_on_peft_with_one_warning(case):
    kw = {"embedding": {"target_modules": ["c_attn", "wte"]}, "dora": {"use_dora": True},
          "lora_bias": {"lora_bias": True}, "two_adapters": {}}[case]
    pm = _peft("gpt2", **kw).eval()
    if case == "two_adapters":
        pm.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
        pm.base_model.set_adapter(["default", "other"])
    ref_model = copy.deepcopy(pm)
    reason = {"embedding": "embedding: base_model.model.transformer.wte", "dora": "DoRA: .*h.0.attn.c_attn",
              "lora_bias": "lora_bias: .*h.0.attn.c_attn", "two_adapters": "2 active adapters .*h.0.attn.c_attn"}[case]
    with pytest.warns(UserWarning, match=f"stay on PEFT's own path.* — .*{reason}") as record:
        patch_peft(pm)
    assert len([w for w in record if "patch_peft" in str(w.message)]) == 1
    message = str(record[0].message)
    if case == "embedding":
        assert "transformer.wte" in message and "c_attn" not in message
        assert sum(is_patched(m) for m in pm.modules()) == 2  # the two c_attn
    elif case == "two_adapters":
        assert "transformer.h.0.attn.c_attn" in message and "c_fc" not in message  # 'other' only on c_attn
    else:
        assert not any(is_patched(m) for m in pm.modules())
    ids = _ids()
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref_model(input_ids=ids).logits, TOL, case)


def test_non_float_base_weight_is_left_as_quantised():
    """A base whose weight is not a float Parameter (how quantised bases look) is named and left alone."""
    pm = _peft("llama")
    layer = pm.base_model.model.model.layers[1].self_attn.o_proj
    w = layer.base_layer.weight
    layer.base_layer.weight = nn.Parameter(w.detach().to(torch.int8), requires_grad=False)
    with pytest.warns(UserWarning, match=r"1 of 8 .*quantised base weight \(Parameter, torch.int8\): "
                                         r"base_model.model.model.layers.1.self_attn.o_proj$"):
        patch_peft(pm)
    assert not is_patched(layer) and sum(is_patched(m) for m in pm.modules()) == 7


def test_bf16_layer_within_half_precision_error():
    """bf16 base, fp32 adapters (PEFT's default autocast_adapter_dtype): error vs fp64 at most twice PEFT's own."""
    base = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)
    x = torch.randn(37, 64).to(torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = lora_fast.lora_linear_ref(x, layer.base_layer.weight, layer.base_layer.bias, a, b, layer.scaling["default"],
                                    upcast=True)
    with torch.no_grad():
        peft_err = rel_err(layer(x), ref)
        patch_peft(pm)
        ours = layer(x)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, ref) <= 2 * peft_err + 1e-4 and rel_err(ours, ref) <= 1e-2


def test_fp16_layer_equals_peft_under_grad_scaler_sized_gradients():
    """fp16 base, fp32 adapters (PEFT's default), no autocast, on the reference path: PEFT casts x to fp32 for the
    LoRA term and rounds once after adding it to the base output; lora_fast does the same, so outputs and every
    gradient are bit-equal to PEFT's — including dA and dB past fp16's range (a GradScaler-sized dy), finite in both."""
    base = nn.Sequential(nn.Linear(32, 40)).half()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = pm.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == b.dtype == torch.float32
    with torch.no_grad():
        b.normal_(0, 0.5)
    x = (torch.rand(64, 32) + 0.5).half()
    dy = torch.full((64, 40), 2048.0, dtype=torch.float16)

    def run():
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.backward(dy)
        grads = (xg.grad, a.grad.clone(), b.grad.clone())
        a.grad = b.grad = None
        return y.detach(), *grads

    theirs = run()
    patch_peft(pm)
    assert is_patched(layer)
    ours = run()
    assert theirs[2].abs().max() > 65504  # dA past fp16's range: finite only because both compute it in fp32
    for name, o, t in zip(("y", "dx", "dA", "dB"), ours, theirs, strict=True):
        assert o.dtype == t.dtype and torch.isfinite(o).all(), name
        assert torch.equal(o, t), f"{name}: differs from PEFT by {rel_err(o, t):.2e}"



def test_fp16_hooked_base_equals_peft():
    """A base with a forward hook takes the non-fused path, base(x) + the adapter's term: on an fp16 model the fp32
    term is added to the base output in fp32 and rounded once, as PEFT does (rounding the term to fp16 first put
    outputs 1 ulp off). Outputs and every gradient bit-equal to PEFT's layer with the same hook and weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48)).half()
    pm = get_peft_model(copy.deepcopy(net), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    theirs = pm.base_model.model[0]
    ours = LinearWithLoRA(net[0], rank=4, alpha=8, backend="reference")
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(0, 0.1)
        ours.lora.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora.lora_B.copy_(theirs.lora_B["default"].weight)
    for layer in (theirs.base_layer, ours.linear):
        layer.register_forward_hook(lambda m, i, o: o)
    assert not ours.fusable()
    x, dy = torch.randn(16, 64).half(), torch.randn(16, 48).half()

    def run(layer, a, b):
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.backward(dy)
        return y.detach(), xg.grad, a.grad, b.grad

    got = run(ours, ours.lora.lora_A, ours.lora.lora_B)
    want = run(theirs, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight)
    for name, o, t in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert o.dtype == t.dtype and torch.equal(o, t), f"{name}: differs from PEFT by {rel_err(o, t):.2e}"

@pytest.fixture
def triton_device(monkeypatch):
    """The device the Triton kernels run on here: CUDA, else CPU through triton's interpreter (for this test)."""
    if TRITON_DEVICE is None:
        pytest.skip("triton missing: patch_peft's Triton path is tested where triton is installed (CI, GPU)")
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return TRITON_DEVICE


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_triton_path_matches_peft(triton_device, conv1d, dropout):
    """One PEFT layer on backend="triton": PEFT's output and gradients (no dropout), or exactly lora_fast's own
    layer with the same seed (dropout: the mask comes from the kernels' generator)."""
    tol = 1e-5 if triton_device == "cpu" else 2e-3  # interpreter: exact fp32 dots; GPU: TF32 may be allowed
    base = transformers.pytorch_utils.Conv1D(48, 32) if conv1d else nn.Linear(32, 48)  # in 32, out 48
    pm = get_peft_model(nn.Sequential(base).to(triton_device),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"],
                                   fan_in_fan_out=conv1d))
    layer = pm.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(0, 0.2)
    ref_layer = copy.deepcopy(layer)
    patch_peft(pm, backend="triton")
    x = torch.randn(2, 7, 32, device=triton_device)
    dy = torch.randn(2, 7, 48, device=triton_device)
    if dropout:
        ours = LinearWithLoRA(layer.base_layer, rank=4, alpha=8, dropout=dropout, backend="triton")
        ours.lora.lora_A, ours.lora.lora_B = a, b
        torch.manual_seed(3)
        y = layer(x)
        torch.manual_seed(3)
        assert torch.equal(y, ours(x))
        return
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, y_ref = layer(xs[0]), ref_layer(xs[1])
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(xs[0].grad, xs[1].grad, tol, "dx")
    assert_rel_close(a.grad, ref_layer.lora_A["default"].weight.grad, tol, "dA")
    assert_rel_close(b.grad, ref_layer.lora_B["default"].weight.grad, tol, "dB")


def test_bad_input():
    with pytest.raises(TypeError, match="PeftModel"):
        patch_peft("not a model")
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        patch_peft(_gpt2())
    with pytest.raises(ValueError, match="backend must be None or one of"):  # at patch time, not first forward
        patch_peft(_peft("gpt2"), backend="fast")
    with pytest.raises(ValueError, match="unpatch_peft: GPT2LMHeadModel has no PEFT LoRA layer"):
        unpatch_peft(_gpt2())  # was a silent no-op
    with pytest.warns(UserWarning, match="none of the 8 LoRA layer.* was patched: nothing done"):
        unpatch_peft(_peft("gpt2"))
    assert lora_fast.patch_peft is patch_peft and lora_fast.unpatch_peft is unpatch_peft


def test_patched_model_pickles_and_replicates(spy):
    """The patch is a class swap, not a bound method on the instance: a patched model pickles (and loads back
    still patched), and a data-parallel style replica computes with its own tensors."""
    import io

    pm = _peft("gpt2").eval()
    patch_peft(pm)
    ids = _ids()
    ref = pm(input_ids=ids).logits
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert sum(is_patched(m) for m in loaded.modules()) == sum(is_patched(m) for m in pm.modules()) > 0
    spy.clear()
    assert_rel_close(loaded(input_ids=ids).logits, ref, 1e-6, "pickled patched model")
    assert spy  # the loaded copy runs through lora_fast too
    layer = next(m for m in pm.modules() if is_patched(m))
    replica = layer._replicate_for_data_parallel()  # what nn.DataParallel does per device (shallow copies)
    replica._modules["lora_B"] = copy.deepcopy(layer.lora_B)  # the replica's own B (DataParallel broadcasts one)
    with torch.no_grad():
        for p in replica.lora_B.parameters():
            p.zero_()  # zero only the replica's B: its output must then be the base alone
    x = torch.randn(3, layer.in_features)
    assert rel_err(layer(x), layer.base_layer(x)) > 1e-3  # the original still has its adapter
    assert_rel_close(replica(x), layer.base_layer(x), 1e-6, "replica uses its own tensors")


def test_base_layer_doing_more_than_linear_stays_on_peft():
    """A base_layer whose forward does more than nn.Linear's (an overriding subclass, or a hook added after
    patching) is computed by PEFT's own forward, so the patched model's output never changes."""
    torch.manual_seed(0)

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    seq = nn.Sequential()
    seq.add_module("proj", Doubled(12, 6))
    pm = get_peft_model(seq, LoraConfig(r=3, lora_alpha=6, target_modules=["proj"]))
    x = torch.randn(4, 12)
    ref = pm(x).detach()
    with pytest.warns(UserWarning, match="runs more than nn.Linear/Conv1D's forward"):
        patch_peft(pm)
    assert_rel_close(pm(x), ref.double(), TOL, "subclass base")

    pm = _peft("llama").eval()
    ids = _ids()
    patch_peft(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)  # added after patching
    with torch.no_grad():
        hooked = pm(input_ids=ids).logits
        unpatch_peft(pm)
        assert_rel_close(hooked, pm(input_ids=ids).logits.double(), TOL, "hooked base after patching")
    assert len(calls) == 2


class _ScaledDropout(nn.Dropout):  # a dropout subclass computing something else than its .p says
    def forward(self, x):
        return 0.5 * super().forward(x)


class _DoubledLinear(nn.Linear):  # an adapter Linear with its own forward
    def forward(self, x):
        return 2.0 * super().forward(x)


def _accelerate_style_forward(module, *args, **kwargs):  # accelerate's add_hook_to_module replaces forward so
    return module._old_forward(*args, **kwargs)  # (a partial on the instance; deepcopy gives the copy its own)


class _WrappedWeight(torch.Tensor):  # a float tensor subclass, as a quantised base's weight looks (torchao, ...)
    def __deepcopy__(self, memo):  # torch's default needs new_empty to keep the subclass
        return nn.Parameter(self.detach().clone(), requires_grad=self.requires_grad)


CASES = ["dropout_subclass", "linear_subclass", "trainable_bias", "p_one", "trainable_weight", "lora_A_bias",
         "lora_B_bias", "dropout_hook", "subclass_weight", "forward_replaced"]


@pytest.mark.parametrize("case", CASES)
def test_layers_whose_modules_compute_something_else_stay_on_peft(case):
    """What lora_linear cannot reproduce from the layer's tensors and ``.p`` stays on PEFT's path, named: a
    dropout or lora_A subclass with its own forward (they were patched and their forward silently ignored), a
    trainable bias (PEFT's bias="lora_only") or weight (an unfrozen base: the fused kernels give W₀ no gradient),
    dropout p = 1 in training (a crash before; in eval it is patched and runs without dropout), a bias on lora_A or
    lora_B (a hand-built or edited adapter; lora_linear has no term for it), a hook on the adapter's dropout, a
    base weight that is a tensor subclass (a quantised format's; the kernels would read its raw storage) and a
    forward already replaced on the instance (accelerate's hooks: the class swap would not be what runs). The
    numbers equal unpatched PEFT's."""
    pm = _peft("gpt2", dropout=0.0, bias="lora_only" if case == "trainable_bias" else "none").eval()
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    if case == "dropout_subclass":
        layer.lora_dropout["default"] = _ScaledDropout(0.0)
    elif case == "trainable_weight":
        layer.base_layer.weight.requires_grad_(True)
    elif case in ("lora_A_bias", "lora_B_bias"):  # an nn.Linear with a bias in place of PEFT's bias-free one
        key = case.split("_")[1]
        old = getattr(layer, f"lora_{key}")["default"]
        new = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.normal_()  # large enough to change the logits
        getattr(layer, f"lora_{key}")["default"] = new
    elif case == "dropout_hook":
        layer.lora_dropout["default"].register_forward_hook(lambda m, i, o: 0.5 * o)
    elif case == "subclass_weight":
        w = layer.base_layer.weight
        layer.base_layer.weight = nn.Parameter(w.detach().clone().as_subclass(_WrappedWeight), requires_grad=False)
    elif case == "forward_replaced":
        layer._old_forward = layer.forward
        layer.forward = functools.partial(_accelerate_style_forward, layer)
    elif case == "linear_subclass":
        old = layer.lora_A["default"]
        new = _DoubledLinear(old.in_features, old.out_features, bias=False)
        new.weight = old.weight
        layer.lora_A["default"] = new
    elif case == "p_one":
        layer.lora_dropout["default"] = nn.Dropout(1.0).eval()
    ref_model = copy.deepcopy(pm)
    reason = {"dropout_subclass": "custom dropout _ScaledDropout", "linear_subclass": "lora_A/lora_B with their own",
              "trainable_bias": "trainable base weight or bias", "p_one": None,
              "trainable_weight": "trainable base weight or bias", "lora_A_bias": "lora_bias",
              "lora_B_bias": "lora_bias",
              "dropout_hook": "hooks or offloaded weights on the adapter's modules",
              "subclass_weight": r"quantised base weight \(_WrappedWeight, torch.float32\)",
              "forward_replaced": "forward already replaced"}[case]
    if case == "p_one":  # eval mode: patched; in training each call goes to PEFT's path (the check runs per call)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            patch_peft(pm)
        assert is_patched(layer)
        with torch.no_grad():  # eval through lora_fast: dropout off, p = 1 not passed on (it raised before)
            ids = _ids()
            assert_rel_close(pm(input_ids=ids).logits, ref_model(input_ids=ids).logits, TOL, "p = 1 eval")
        pm.train()
        ref_model.train()
    else:
        with pytest.warns(UserWarning, match=f"stay on PEFT's own path.* — {reason}"):
            patch_peft(pm)
        assert not is_patched(layer) if case != "trainable_bias" else not any(is_patched(m) for m in pm.modules())
    ids = _ids()
    loss, grads = _loss_and_grads(pm, ids)
    loss_ref, grads_ref = _loss_and_grads(ref_model, ids)
    assert_rel_close(loss, loss_ref, TOL, case)
    for n, g in grads.items():
        assert_rel_close(g, grads_ref[n], TOL, f"{case} {n}")


def test_layers_lacking_an_active_adapter_compute_what_peft_does():
    """Two adapters on different modules ("other" only on c_attn): a layer computes the active adapters it has, as
    PEFT skips those it lacks. With only "other" active, the c_fc/c_proj layers have none (left to PEFT: the base
    alone); with ["other", "default"] active the c_fc/c_proj layers have one ("default") and run through lora_fast
    with it, the c_attn layers (two) stay on PEFT."""
    pm = _peft("gpt2").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B.other" in name:
                p.normal_()  # B is zero at init: make the other adapter matter
    ids = _ids()
    for active in ("other", ["other", "default"]):
        model = copy.deepcopy(pm)
        model.base_model.set_adapter(active)
        ref = copy.deepcopy(model)
        with pytest.warns(UserWarning, match="stay on PEFT's own path"):
            patch_peft(model)
        fc = model.base_model.model.transformer.h[0].mlp.c_fc
        assert is_patched(fc) == (active != "other")  # only "default" lives there
        with torch.no_grad():
            assert_rel_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, TOL, f"active {active}")


def test_lora_variant_stays_on_peft():
    """A LoRA variant (KaSA: a learned diagonal between A and B, ΔW = s·B·diag(d)·A) is a plain ``lora.Linear``
    with ``use_dora`` False, but lora_linear has no term for its extra parameter: left to PEFT, named."""
    from peft.tuners.lora.config import KasaConfig

    pm = _peft("llama", kasa_config=KasaConfig()).eval()  # _peft randomises lora_diag too (a "lora_" parameter)
    ref = copy.deepcopy(pm)
    with pytest.warns(UserWarning, match="8 of 8 .*LoRA variant KasaLinearVariant"):
        patch_peft(pm)
    assert not any(is_patched(m) for m in pm.modules())
    ids = _ids()
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, TOL, "KaSA")


def test_patching_a_lone_layer_and_patching_again_with_another_backend():
    """patch_peft takes any module holding PEFT LoRA layers, the layer itself included; patching again sets the
    backend anew (here: "triton", which refuses CPU tensors without TRITON_INTERPRET, then "reference")."""
    seq = nn.Sequential()
    seq.add_module("proj", nn.Linear(12, 6))
    layer = get_peft_model(seq, LoraConfig(r=3, lora_alpha=6, target_modules=["proj"])).base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(4, 12)
    ref = layer(x).detach()
    assert patch_peft(layer, backend="triton") is layer and is_patched(layer)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        layer(x)
    patch_peft(layer, backend="reference")
    assert_rel_close(layer(x), ref.double(), TOL, "lone layer, reference backend")


def test_a_layer_unsupported_when_patched_takes_the_fused_path_after_set_adapter(spy):
    """patch_peft swaps the class of every structurally supported layer, even one whose active adapter is
    unsupported at that moment (a DoRA adapter, or none in the layer): it defers to PEFT while so, and takes
    lora_fast's path once set_adapter picks a plain adapter (it used to stay on PEFT's path for good)."""
    pm = _peft("gpt2").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("dora", LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["c_attn"],
                                          fan_in_fan_out=True))
    pm.base_model.set_adapter("dora")
    ref = copy.deepcopy(pm)
    with pytest.warns(UserWarning, match=r"8 of 8 LoRA layer\(s\) stay on PEFT's own path until .* — DoRA: "
                                         r"base_model.model.transformer.h.0.attn.c_attn, "
                                         r"base_model.model.transformer.h.1.attn.c_attn; no active adapter in this "
                                         r"layer: base_model.model.transformer.h.0.attn.c_proj, "):
        patch_peft(pm)
    assert all(type(m).__name__ == "FastLoraLinear" for n, m in pm.named_modules() if n.endswith(("c_attn", "c_fc")))
    ids = _ids()
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, TOL, "DoRA active")
    assert not spy  # c_attn: DoRA; the others: no active adapter ("dora" lives on c_attn only)
    c_attn = pm.base_model.model.transformer.h[0].attn.c_attn
    assert not is_patched(c_attn)
    for model in (pm, ref):
        model.base_model.set_adapter("default")
    spy.clear()
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, TOL, "default active")
    assert len(spy) == 8 and is_patched(c_attn)


def test_patching_again_a_layer_hooked_since_updates_its_backend(spy):
    """A patched layer whose forward an accelerate hook replaced since is still patched: patching again sets the
    new backend, with no warning (it was refused as "forward already replaced" while it kept the old backend)."""
    pm = _peft("gpt2").eval()
    ref = copy.deepcopy(pm)
    patch_peft(pm, backend="auto")
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    layer._old_forward = layer.forward  # what accelerate's add_hook_to_module does (a no-op hook)
    layer.forward = functools.partial(_accelerate_style_forward, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_peft(pm, backend="reference")
    assert getattr(layer, peft_compat._MARK) == "reference" and is_patched(layer)
    ids = _ids()
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, TOL, "hooked, patched again")
    assert len(spy) == 8


def test_patch_peft_that_fails_midway_leaves_every_layer_as_it_was(monkeypatch):
    """An exception while patching (here: the state check of the third layer) puts back the class and backend mark
    of the layers already patched in that call — including one patched before with another backend — so the model
    is never half on lora_fast's path; it used to keep the first layers patched."""
    pm = _peft("gpt2")
    first = next(iter(peft_compat._peft_lora_layers(pm).values()))
    patch_peft(first, backend="reference")
    classes = {n: type(m) for n, m in peft_compat._peft_lora_layers(pm).items()}
    marks = {n: m.__dict__.get(peft_compat._MARK, "none") for n, m in peft_compat._peft_lora_layers(pm).items()}
    ids = _ids()
    want = _loss_and_grads(pm, ids)
    real, calls = peft_compat._state_reason, []

    def failing(module):
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("state check failed")
        return real(module)

    monkeypatch.setattr(peft_compat, "_state_reason", failing)
    with pytest.raises(RuntimeError, match="state check failed"):
        patch_peft(pm, backend="auto")
    assert len(calls) == 3
    assert {n: type(m) for n, m in peft_compat._peft_lora_layers(pm).items()} == classes
    assert {n: m.__dict__.get(peft_compat._MARK, "none") for n, m in peft_compat._peft_lora_layers(pm).items()} == marks
    loss, grads = _loss_and_grads(pm, ids)
    assert_rel_close(loss, want[0].double(), TOL, "loss after a failed patch")
    for n, g in grads.items():
        assert_rel_close(g, want[1][n].double(), TOL, n)


def test_patch_peft_under_warnings_as_errors_patches_nothing():
    """With warnings turned into errors (pytest's filterwarnings=error, python -W error), the warning that names
    the layers left to PEFT raises out of patch_peft: every layer it had patched is put back (the two c_attn of a
    model whose other targets use DoRA used to stay patched)."""
    pm = _peft("gpt2", target_modules=["c_attn"])
    pm.add_adapter("dora", LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["c_fc"]))
    pm.base_model.set_adapter(["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match="stay on PEFT's own path"):
            patch_peft(pm)
    assert not any(is_patched(m) for m in pm.modules())


def test_a_removed_hook_leaves_the_fused_path_on(spy):
    """accelerate's ``remove_hook_from_module`` sets ``module.forward`` back to the class's forward bound to the
    module, in the instance's ``__dict__``. That runs what the class runs: the layer takes the fused path again, as
    patch_peft's warning says (a base or LoRA layer once hooked stayed on PEFT's path for good), and a LoRA layer
    unhooked so before patching is patched (it was "forward already replaced")."""
    pm = _peft("gpt2").eval()
    ref = copy.deepcopy(pm)
    layers = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    layers[0].base_layer.forward = layers[0].base_layer.forward  # hooked and unhooked, before patching
    layers[1].forward = layers[1].forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_peft(pm)
    layers[2].base_layer.forward = layers[2].base_layer.forward  # and after
    assert all(is_patched(m) for m in layers)
    ids = _ids()
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, TOL, "unhooked layers")
    assert len(spy) == len(layers) == 8
    lin = LinearWithLoRA(nn.Linear(8, 4), rank=2)
    lin.linear.forward = lin.linear.forward
    assert lin.fusable()
    lin.linear.forward = functools.partial(_accelerate_style_forward, lin.linear)
    lin.linear._old_forward = nn.Linear.forward.__get__(lin.linear)
    assert not lin.fusable()  # a real replacement still counts


def test_an_unpatched_layer_whose_hook_kept_the_fast_forward_runs_peft(spy):
    """A hook added after patching captures the bound fast forward, and removing it puts that back on the
    instance; after ``unpatch_peft`` the layer must run PEFT's forward (it raised AttributeError on the missing
    backend mark, and patching again refused the layer as "forward already replaced")."""
    pm = _peft("gpt2").eval()
    ref = copy.deepcopy(pm)
    patch_peft(pm)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    layer.forward = layer.forward  # a bound FastLoraLinear.forward, as a removed accelerate hook leaves it
    unpatch_peft(pm)
    ids = _ids()
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, TOL, "unpatched, fast forward kept")
    assert spy == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_peft(pm)  # the leftover forward is what the patched class runs: patched, no warning
    assert is_patched(layer) and "forward" not in layer.__dict__
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, TOL, "patched again")
    assert len(spy) == 8


def test_compiled_hotswap_with_patched_layers(tmp_path):
    """PEFT's compiled-hotswap recipe (``prepare_model_for_compiled_hotswap``, ``torch.compile(fullgraph=True)``,
    ``hotswap_adapter`` without recompiling) holds each scaling as a 0-d tensor. A patched layer read it with
    ``float()`` (a data-dependent graph break: fullgraph failed, and without fullgraph the swap recompiled); under
    compile it now defers to PEFT's forward, and the swapped adapter's outputs equal a fresh load's."""
    hotswap = pytest.importorskip("peft.utils.hotswap", reason="peft without hotswap (< 0.15): none to test")
    import torch._dynamo

    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        pm = _peft("gpt2", target_modules=["c_attn"])
        pm.save_pretrained(tmp_path / str(seed))
        dirs.append(tmp_path / str(seed))
    torch.manual_seed(0)
    base = _gpt2()
    fresh = PeftModel.from_pretrained(copy.deepcopy(base), dirs[1]).eval()
    pm = PeftModel.from_pretrained(base, dirs[0]).eval()
    hotswap.prepare_model_for_compiled_hotswap(pm, target_rank=4)
    patch_peft(pm)
    ids = _ids()
    torch._dynamo.reset()
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            compiled(input_ids=ids)
            hotswap.hotswap_adapter(pm, str(dirs[1]), adapter_name="default")
            out = compiled(input_ids=ids).logits
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        assert_rel_close(out, fresh(input_ids=ids).logits, TOL, "hot-swapped adapter")
    with torch.no_grad():  # eager: the fused path, reading the tensor's value
        assert_rel_close(pm(input_ids=ids).logits, fresh(input_ids=ids).logits, TOL, "eager after the swap")
    assert all(is_patched(m) for m in pm.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
