"""LoRALayer and LinearWithLoRA: construction, forward and every gradient against fp64 math, merge, errors."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from lora_fast import LinearWithLoRA, LoRALayer
from tests.utils import MISSING, assert_half_precision, assert_rel_close, rel_err

BACKEND = "reference"  # these tests pin the module layer; kernel paths are tested in test_kernels/test_triton_fn


def _base(kind, k, n, bias=True):
    if kind == "linear":
        return nn.Linear(k, n, bias=bias)
    conv = Conv1D(n, k)
    if not bias:  # Conv1D always has a bias; zero it to cover the "no bias" math
        conv.bias.data.zero_()
    return conv


def _w_nk(layer):
    w = layer.linear.weight.detach().double()
    return w.t() if layer.fan_in_fan_out else w


def _random_adapter(layer):
    with torch.no_grad():
        layer.lora.lora_B.normal_()
    return layer


def _expected(layer, x):
    """fp64 y = x W^T + b + s (x A^T) B^T from the layer's own tensors."""
    xd = x.detach().double()
    b = layer.linear.bias
    y = xd @ _w_nk(layer).t() + (b.detach().double() if b is not None else 0)
    a, bb = layer.lora.lora_A.detach().double(), layer.lora.lora_B.detach().double()
    return y + layer.scaling * (xd @ a.t()) @ bb.t()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (7,), (2, 5), (2, 3, 4)])
def test_forward_and_gradients(kind, bias, lead):
    K, N, r = 13, 11, 3
    layer = _random_adapter(LinearWithLoRA(_base(kind, K, N, bias), rank=r, alpha=6.0, backend=BACKEND))
    x = torch.randn(*lead, K, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, N)
    assert_rel_close(y, _expected(layer, x), 1e-5, "y")

    # gradients against autograd on the fp64 formula
    g = torch.randn_like(y)
    y.backward(g)
    xd = x.detach().double().requires_grad_()
    a = layer.lora.lora_A.detach().double().requires_grad_()
    bb = layer.lora.lora_B.detach().double().requires_grad_()
    y64 = xd @ _w_nk(layer).t() + layer.scaling * (xd @ a.t()) @ bb.t()
    y64.backward(g.double())
    assert_rel_close(x.grad, xd.grad, 1e-5, "dx")
    assert_rel_close(layer.lora.lora_A.grad, a.grad, 1e-5, "dA")
    assert_rel_close(layer.lora.lora_B.grad, bb.grad, 1e-5, "dB")
    assert layer.linear.weight.grad is None and not layer.linear.weight.requires_grad
    if layer.linear.bias is not None:
        assert layer.linear.bias.grad is None


def test_fresh_adapter_is_identity_and_init():
    base = nn.Linear(64, 32)
    layer = LinearWithLoRA(base, rank=4, alpha=8.0)
    assert layer.linear is base  # wrapped, not copied
    x = torch.randn(10, 64)
    assert torch.equal(layer(x), base(x))
    a = layer.lora.lora_A
    assert a.shape == (4, 64) and layer.lora.lora_B.shape == (32, 4)
    assert torch.count_nonzero(layer.lora.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5): bound = sqrt(6 / ((1 + 5) fan_in))
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert layer.scaling == 2.0 and layer.in_features == 64 and layer.out_features == 32


def test_two_constructors():
    a = LinearWithLoRA(8, 5, 2, 4.0, False, 0.1)  # in, out, rank, alpha, bias, dropout
    assert isinstance(a.linear, nn.Linear) and a.linear.bias is None
    assert (a.in_features, a.out_features, a.rank, a.lora.alpha, a.lora.dropout) == (8, 5, 2, 4.0, 0.1)
    b = LinearWithLoRA(nn.Linear(8, 5), 2, 4.0, 0.1)  # base, rank, alpha, dropout
    assert (b.rank, b.lora.alpha, b.lora.dropout, b.scaling) == (2, 4.0, 0.1, 2.0)
    c = LinearWithLoRA(8, 5, rank=2, bias=True)
    assert c.linear.bias is not None and c.lora.scaling == 8.0
    rs = LinearWithLoRA(nn.Linear(8, 5), rank=4, alpha=8.0, use_rslora=True)
    assert rs.scaling == pytest.approx(8.0 / 2.0)
    assert "rank=4" in repr(rs) and "use_rslora=True" in repr(rs)
    # the first argument by keyword, as the README's table names it; numpy ints as sizes
    kw = LinearWithLoRA(in_features=8, out_features=5, rank=2, bias=False)
    assert (kw.in_features, kw.out_features, kw.rank, kw.linear.bias) == (8, 5, 2, None)
    base = nn.Linear(8, 5)
    assert LinearWithLoRA(base=base, rank=2).linear is base
    assert isinstance(LinearWithLoRA(np.int64(8), np.int64(5)).linear, nn.Linear)
    for args, kwargs, what in [((), {}, r"with out_features\)$"), ((base,), {"base": base}, "got base= beside"),
                               ((), {"base": base, "in_features": 8}, "got base= and in_features=")]:
        with pytest.raises(TypeError, match=rf"needs one module to wrap .*{what}"):
            LinearWithLoRA(*args, **kwargs)
    with pytest.raises(TypeError, match=r"is missing out_features"):  # as nn.Linear(8): a TypeError naming it
        LinearWithLoRA(8, rank=2)


def test_built_on_the_meta_device_as_nn_linear():
    """A layer that builds its own base builds on ``meta`` when asked (``device="meta"`` or a ``torch.device``
    context), as nn.Linear and PEFT's layer do: the empty-init pattern (build on meta, ``to_empty``,
    ``reset_parameters``) then gives a working layer. Wrapping an existing meta base stays refused: there the
    weight may be accelerate's offload, which the wrapper cannot compute with."""
    for layer in (LinearWithLoRA(16, 12, rank=4, device="meta"), _on_meta(lambda: LinearWithLoRA(16, 12, rank=4))):
        assert layer.weight.device.type == "meta" and layer.lora.lora_A.device.type == "meta"
        layer.to_empty(device="cpu")
        layer.linear.reset_parameters()
        layer.reset_parameters()
        x = torch.randn(3, 16)
        assert_rel_close(layer(x), _expected(layer, x), 1e-5, "materialised after a meta build")
        assert not layer.lora.lora_B.any() and layer.lora.lora_A.abs().max() <= 1 / 16**0.5
    with pytest.raises(ValueError, match="offloaded or on the meta device"):
        LinearWithLoRA(nn.Linear(16, 12, device="meta"), rank=4)
    # built on meta and only its base loaded (load_state_dict(assign=True)): F.linear of a CPU input with the meta
    # adapter returned uninitialised memory, silently wrong numbers; every path now names the tensors left on meta
    layer = _on_meta(lambda: LinearWithLoRA(16, 12, rank=4))
    base = nn.Linear(16, 12)
    layer.linear.load_state_dict(base.state_dict(), assign=True)
    with pytest.raises(RuntimeError, match="x is on cpu but lora_A on meta, lora_B on meta"):
        layer(torch.randn(3, 16))
    layer.linear.register_forward_hook(lambda m, i, o: None)  # the unfused path (base + LoRALayer) too
    with pytest.raises(RuntimeError, match="LoRALayer: x is on cpu but lora_A on meta, lora_B on meta"):
        layer(torch.randn(3, 16))


def _on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": -2}, ValueError, "rank"),
        ({"rank": 2.5}, ValueError, "rank"),
        ({"rank": True}, ValueError, "rank"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"alpha": 0}, ValueError, "alpha"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"bogus": 1}, TypeError, "bogus"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        LinearWithLoRA(nn.Linear(4, 4), **kwargs)
    if exc is ValueError:
        with pytest.raises(exc, match=word):
            LoRALayer(4, 4, **kwargs)


def test_bad_base_and_bad_input():
    with pytest.raises(TypeError, match="Conv2d"):
        LinearWithLoRA(nn.Conv2d(3, 3, 1))
    for kw in ({"dtype": torch.float16}, {"device": "cpu"}):  # were silently ignored next to a base module
        with pytest.raises(TypeError, match="a wrapped base keeps its own"):
            LinearWithLoRA(nn.Linear(4, 4), rank=2, **kw)
    assert LinearWithLoRA(4, 4, rank=2, dtype=torch.float16).weight.dtype == torch.float16
    with pytest.raises(TypeError):
        LinearWithLoRA("linear")
    layer = LinearWithLoRA(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"in_features=6.*last dimension is 5"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="in_features=6"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"in_features=6.*5"):
        LoRALayer(6, 4)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):  # A, B cast to int: all zeros
        LoRALayer(6, 4)(torch.ones(2, 6, dtype=torch.int64))
    layer.merge_weights()
    with pytest.raises(ValueError, match=r"in_features=6.*5"):
        layer(torch.randn(3, 5))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge(kind):
    layer = _random_adapter(LinearWithLoRA(_base(kind, 16, 12), rank=4, alpha=8.0))
    x = torch.randn(5, 16)
    y = layer(x)
    w0 = layer.linear.weight.detach().clone()
    layer.merge_weights()
    assert layer.merged
    assert_rel_close(layer(x), y, 1e-6, "merged")
    assert_rel_close(layer.linear(x), y, 1e-6, "merged base alone")
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge_weights()
    assert_rel_close(layer(x), y, 1e-6, "double merge is a no-op")
    layer.unmerge_weights()
    assert not layer.merged
    assert_rel_close(layer.linear.weight, w0, 1e-6, "unmerged weight")
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge_weights()
    assert_rel_close(layer.linear.weight, w0, 1e-6, "double unmerge is a no-op")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_uses_fp32_delta(dtype):
    layer = _random_adapter(LinearWithLoRA(nn.Linear(32, 16).to(dtype), rank=4, alpha=8.0))
    assert layer.lora.lora_A.dtype == torch.float32  # fp32 adapters on a half base
    w0 = layer.linear.weight.detach().clone()
    expected = (w0.float() + layer.scaling * layer.lora.lora_B.detach() @ layer.lora.lora_A.detach()).to(dtype)
    layer.merge_weights()
    assert torch.equal(layer.linear.weight, expected)
    x = torch.randn(3, 32, dtype=dtype)
    layer.unmerge_weights()
    y = layer(x)
    assert y.dtype == dtype
    assert_rel_close(y, _expected(layer, x), 1e-2, "half forward")


def test_dropout_only_in_training_mode():
    layer = _random_adapter(LinearWithLoRA(nn.Linear(32, 8), rank=4, dropout=0.5))
    x = torch.randn(20, 32)
    layer.eval()
    assert_rel_close(layer(x), _expected(layer, x), 1e-5, "eval = no dropout")
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert torch.equal(y1, y2)  # reproducible under torch.manual_seed
    assert not torch.allclose(y1, _expected(layer, x).float(), rtol=1e-3, atol=1e-3)
    # dropout touches only the LoRA term, and inverted dropout keeps its expectation: the mean LoRA part over many
    # draws approaches the eval-mode LoRA part (relative error ~ 1/sqrt(draws))
    with torch.no_grad():
        base = layer.linear(x)
        mean_lora = torch.stack([layer(x) - base for _ in range(400)]).mean(0)
        layer.eval()
        eval_lora = layer(x) - base
    assert_rel_close(mean_lora, eval_lora, 0.1, "E[dropout LoRA term]")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_gradients_equal_float64_with_the_drawn_mask(kind):
    """The module's default path in training with dropout: y, dx, dA and dB equal the float64 reference with the
    mask the layer drew (torch.rand(x.shape) >= p from torch's generator, as nn.Dropout; replayed from the seed),
    at odd sizes with leading dimensions."""
    torch.manual_seed(0)
    layer = _random_adapter(LinearWithLoRA(_base(kind, 19, 13), rank=3, dropout=0.3, backend="reference")).train()
    x, dy = torch.randn(2, 7, 19), torch.randn(2, 7, 13)
    torch.manual_seed(5)
    got = _grads(layer, x, dy)
    torch.manual_seed(5)
    keep = torch.rand(x.shape) >= 0.3
    assert 0 < (~keep).sum() < keep.numel()
    for name, g, rf in zip(("y", "dx", "dA", "dB"), got, _grads64(layer, x, dy, keep, 0.3), strict=True):
        assert_rel_close(g, rf, 1e-5, name)


def test_lora_layer_returns_the_lora_term_only():
    lora = LoRALayer(10, 6, rank=2, alpha=4.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 4, 10)
    expected = 2.0 * (x.double() @ lora.lora_A.double().t()) @ lora.lora_B.double().t()
    assert_rel_close(lora(x), expected, 1e-6, "lora term")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_state_dict_round_trip(kind):
    torch.manual_seed(0)
    model = nn.Sequential(LinearWithLoRA(_base(kind, 8, 8), rank=2), nn.ReLU(), LinearWithLoRA(_base(kind, 8, 3)))
    for m in model:
        if isinstance(m, LinearWithLoRA):
            _random_adapter(m)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    assert {"0.linear.weight", "0.lora.lora_A", "0.lora.lora_B"} <= set(model.state_dict())
    torch.manual_seed(1)
    other = nn.Sequential(LinearWithLoRA(_base(kind, 8, 8), rank=2), nn.ReLU(), LinearWithLoRA(_base(kind, 8, 3)))
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(4, 8)
    assert torch.equal(model(x), other(x))


def _grads(layer, x, dy):
    """(y, dx, dA, dB) of ``layer`` at x for the upstream gradient dy (the layer's own parameters' grads)."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.lora.lora_A.grad, layer.lora.lora_B.grad


def _grads64(layer, x, dy, keep=None, p=0.0):
    """The float64 (y, dx, dA, dB) of ``layer``'s map with an explicit keep-mask (the oracle)."""
    from lora_fast.reference import lora_linear_ref

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, layer.lora.lora_A, layer.lora.lora_B))
    y = lora_linear_ref(x64, layer.linear.weight, layer.linear.bias, a64, b64, layer.scaling, dropout_p=p,
                        keep_mask=keep, fan_in_fan_out=layer.fan_in_fan_out, upcast=True)
    y.backward(dy.double())
    return y.detach(), x64.grad, a64.grad, b64.grad


@pytest.mark.parametrize("hooked", [False, True])
def test_bf16_activations_with_fp32_adapters_train(hooked):
    """bf16 base and activations, fp32 adapters, on the fused entry and on the non-fused path (a hooked base):
    y and every gradient within 1e-2 of float64 and at most twice the error of PyTorch's own bf16 computation;
    dA and dB in fp32."""
    torch.manual_seed(0)
    layer = _random_adapter(LinearWithLoRA(nn.Linear(48, 40).to(torch.bfloat16), rank=4, backend=BACKEND))
    if hooked:
        layer.linear.register_forward_hook(lambda m, i, o: o)  # an identity hook: base(x) + the LoRA term
        assert not layer.fusable()
    x = torch.randn(33, 48, dtype=torch.bfloat16)
    dy = torch.randn(33, 40, dtype=torch.bfloat16)
    got = _grads(layer, x, dy)
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[2].dtype == got[3].dtype == torch.float32
    torch_bf16 = LinearWithLoRA(nn.Linear(48, 40).to(torch.bfloat16), rank=4, backend=BACKEND).to(torch.bfloat16)
    torch_bf16.load_state_dict(layer.state_dict())  # the same tensors with bf16 adapters: PyTorch's own bf16 error
    ref = _grads64(layer, x, dy)
    for name, g, t, rf in zip(("y", "dx", "dA", "dB"), got, _grads(torch_bf16, x, dy), ref, strict=True):
        err, torch_err = rel_err(g, rf), rel_err(t, rf)
        assert_half_precision(err, torch_err, f"{name} bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer32 = _random_adapter(LinearWithLoRA(nn.Linear(16, 8), rank=2))
        y = layer32(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer32.lora.lora_B.grad.dtype == torch.float32


class _DoubledLinear(nn.Linear):
    """An nn.Linear subclass whose forward does more than F.linear (as a QAT Linear fake-quantising its weight)."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class _TupleLinear(nn.Linear):
    """An nn.Linear whose forward returns a tuple (as Llama 4's router: scores and logits)."""

    def forward(self, x):
        out = super().forward(x)
        return out.sigmoid(), out


def test_a_base_that_returns_no_tensor_is_an_error_naming_it():
    layer = LinearWithLoRA(_TupleLinear(8, 4), rank=2, backend=BACKEND)
    with pytest.raises(TypeError, match="_TupleLinear returns tuple, not a tensor"):
        layer(torch.randn(3, 8))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_non_fused_path_dropout_and_every_gradient(kind):
    """The non-fused path (base(x) + the adapter's term; a hooked base here): in training, dropout on the LoRA input
    with nn.Dropout's mask — recovered by replaying torch's RNG on a tensor of ones — and y, dx, dA, dB equal the
    float64 reference with that mask; in eval no dropout (deterministic, the formula without a mask)."""
    p = 0.4
    layer = _random_adapter(LinearWithLoRA(_base(kind, 24, 20), rank=4, dropout=p, backend=BACKEND))
    layer.linear.register_forward_hook(lambda m, i, o: o)
    assert not layer.fusable()
    x, dy = torch.randn(3, 7, 24), torch.randn(3, 7, 20)
    torch.manual_seed(5)
    got = _grads(layer, x, dy)
    torch.manual_seed(5)
    keep = torch.nn.functional.dropout(torch.ones_like(x), p, True) != 0  # the same draw as the layer's dropout
    assert 0.4 < keep.float().mean() < 0.8  # a real mask: training drops inputs
    for name, g, rf in zip(("y", "dx", "dA", "dB"), got, _grads64(layer, x, dy, keep, p), strict=True):
        assert_rel_close(g, rf, 1e-5, f"train {name}")
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(layer(x), y_eval)
    assert_rel_close(y_eval, _grads64(layer, x, dy)[0], 1e-5, "eval y")


def test_non_fused_path_fp16_adapter_gradients_stay_finite():
    """fp16 base on the non-fused path, fp32 adapters, a GradScaler-sized dy: the adapter's term is computed in fp32
    (the reference's rule, and PEFT's), so dA past fp16's 65504 is finite and matches float64."""
    layer = LinearWithLoRA(nn.Linear(32, 40).half(), rank=4, backend=BACKEND)
    with torch.no_grad():
        layer.lora.lora_A.fill_(0.02)
        layer.lora.lora_B.fill_(0.5)
    layer.linear.register_forward_hook(lambda m, i, o: o)
    x = (torch.rand(64, 32) + 0.5).half()
    dy = torch.full((64, 40), 2048.0, dtype=torch.float16)
    got, ref = _grads(layer, x, dy), _grads64(layer, x, dy)
    assert ref[2].abs().max() > 65504
    assert got[0].dtype == got[1].dtype == torch.float16 and layer.lora(x).dtype == torch.float16  # x's dtype out
    assert_rel_close(got[0], ref[0], 1e-2, "y")
    assert_rel_close(got[1], ref[1], 1e-2, "dx")
    for name, g, rf in zip(("dA", "dB"), got[2:], ref[2:], strict=True):
        assert torch.isfinite(g).all(), name
        assert_rel_close(g, rf, 1e-5, name)


def test_base_forward_runs_when_it_does_more_than_linear():
    """A subclass overriding forward, forward hooks on the base or the adapter, a replaced instance forward: the
    layer computes base(x) + the LoRA term, as PEFT does (the fused path would read the weight around them)."""
    torch.manual_seed(0)
    x = torch.randn(5, 12)

    def lora_term(layer):
        return layer.lora(x)

    layer = LinearWithLoRA(_DoubledLinear(12, 6), rank=3)
    nn.init.normal_(layer.lora.lora_B)
    assert_rel_close(layer(x), (layer.linear(x) + lora_term(layer)).double(), 1e-6, "overriding subclass")
    assert_rel_close(layer(x), (2 * nn.functional.linear(x, layer.weight, layer.bias) + lora_term(layer)).double(),
                     1e-6, "doubled")

    layer = LinearWithLoRA(nn.Linear(12, 6), rank=3)
    nn.init.normal_(layer.lora.lora_B)
    plain = layer(x)
    calls = []
    handle = layer.linear.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0)  # zeroes the base output
    assert_rel_close(layer(x), lora_term(layer).double(), 1e-6, "hooked base")
    assert calls == [1]
    handle.remove()
    assert torch.equal(layer(x), plain)  # back on the fused path
    handle = layer.lora.register_forward_pre_hook(lambda m, i: calls.append(2))
    layer(x)
    assert calls == [1, 2]
    handle.remove()
    layer.linear.forward = lambda inp: 3 * nn.functional.linear(inp, layer.weight, layer.bias)  # as accelerate does
    assert_rel_close(layer(x), (3 * nn.functional.linear(x, layer.weight, layer.bias) + lora_term(layer)).double(),
                     1e-6, "instance forward")
    layer.backend = "triton"  # strict: no silent fallback
    with pytest.raises(RuntimeError, match="backend='triton' cannot fuse this layer"):
        layer(x)


def test_accelerate_offload_after_wrapping():
    """accelerate's cpu_offload moves the weights to the meta device and restores them in forward pre-hooks on the
    base and the adapter: the layer must call those modules (PEFT's order of use works the same)."""
    accelerate = pytest.importorskip("accelerate", reason=MISSING["accelerate"])
    torch.manual_seed(0)
    model = nn.Sequential(LinearWithLoRA(nn.Linear(12, 6), rank=3))
    nn.init.normal_(model[0].lora.lora_B)
    x = torch.randn(4, 12)
    ref = model(x).detach()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model[0].linear.weight.device.type == "meta"
    assert_rel_close(model(x), ref.double(), 1e-6, "offloaded")


def test_fp64_merge_round_trip_is_fp64_exact():
    """A float64 base merges and unmerges in float64 (not through float32): the merged output equals the unmerged
    one and the base weight comes back to within fp64 rounding."""
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 8).double(), rank=4)
    nn.init.normal_(layer.lora.lora_B)
    x = torch.randn(5, 16, dtype=torch.float64)
    w0, y = layer.weight.detach().clone(), layer(x).detach()
    layer.merge_weights()
    assert_rel_close(layer(x), y, 1e-13, "merged")
    layer.unmerge_weights()
    assert (layer.weight - w0).abs().max() < 1e-14


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_meta_device_forward_and_backward_give_shapes(dropout):
    """A model moved to ``meta`` (shape inference, as nn.Linear allows) runs: the autocast query used to raise
    "unknown device type for autocast" there."""
    layer = LinearWithLoRA(Conv1D(12, 20), rank=4, dropout=dropout).to("meta").train()
    x = torch.randn(3, 5, 20, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 12) and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.lora.lora_A.grad.shape == (4, 20)


def _dropout_modules_off(model):  # TRL's disable_dropout_in_model (trl.trainer.utils), which DPO/GRPO/PPO call
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0


def test_hooks_on_the_dropout_module_run_and_a_replaced_module_is_called():
    """A hook on ``lora.lora_dropout`` (or another module put in its place) runs, as PEFT calls its dropout module:
    the layer leaves the fused path for base(x) + the term with the module called. It used to be skipped on every
    path (the fused path regenerates the mask; the adapter's own forward called F.dropout)."""
    torch.manual_seed(0)
    x = torch.randn(5, 12)
    layer = LinearWithLoRA(nn.Linear(12, 6), rank=3, dropout=0.25)
    nn.init.normal_(layer.lora.lora_B)
    base = layer.linear(x)
    calls = []
    handle = layer.lora.lora_dropout.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0)
    assert layer.fusable() is False
    assert torch.equal(layer(x), base)  # the hook zeroed the adapter's input: the term is 0
    assert calls == [1]
    handle.remove()
    assert layer.fusable() is True

    class Halve(nn.Dropout):  # a user's dropout variant with its own forward
        def forward(self, inp):
            return inp * 0.5

    layer.lora.lora_dropout = Halve(0.25)
    expected = base + 0.5 * layer.lora.scaling * x @ layer.lora.lora_A.t() @ layer.lora.lora_B.t()
    assert layer.fusable() is False
    assert_rel_close(layer(x), expected.double(), 1e-6, "replaced dropout module")


@pytest.mark.parametrize("hooked", [False, True])
def test_lora_dropout_is_a_module_that_decides(hooked):
    """The LoRA dropout is an ``nn.Dropout`` (``lora.lora_dropout``, as PEFT's), so what finds dropout by module
    type reaches it: TRL's ``disable_dropout_in_model`` (p = 0: train mode then computes the eval output), MC
    dropout (``eval()``, then ``train()`` on the dropout modules: stochastic). Its own flag decides on the fused and
    the hooked (non-fused) path alike; a probability set on the module outside [0, 1) is refused at the call."""
    torch.manual_seed(0)
    layer = _random_adapter(LinearWithLoRA(nn.Linear(32, 8), rank=4, dropout=0.5, backend=BACKEND))
    if hooked:
        layer.lora.register_forward_pre_hook(lambda module, args: None)
        assert not layer.fusable()
    model = nn.Sequential(layer, nn.Dropout(0.1))
    x = torch.randn(20, 32)
    assert isinstance(layer.lora.lora_dropout, nn.Dropout) and layer.lora.dropout == 0.5
    model.eval()
    want = layer(x).detach()
    model.train()
    assert not torch.equal(layer(x), layer(x))
    _dropout_modules_off(model)
    assert layer.lora.dropout == 0.0
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    layer.lora.dropout = 0.5
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()  # MC dropout
    assert not layer.training and not torch.equal(layer(x), layer(x))
    model.train()
    layer.lora.lora_dropout.eval()  # the module's flag, not the wrapper's
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    layer.lora.lora_dropout.train()
    layer.lora.lora_dropout.p = 1.0
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1.0"):
        layer(x)
    with pytest.raises(ValueError, match="dropout must be"):
        layer.lora.dropout = -0.1


def test_a_layer_pickled_with_a_float_dropout_loads():
    """Before ``lora_dropout`` was a module, ``dropout`` was a float attribute: such a pickle (``torch.save`` of a
    whole model) loads with the module rebuilt from it, in the layer's mode."""
    import pickle

    layer = _random_adapter(LinearWithLoRA(nn.Linear(16, 8), rank=4, dropout=0.25)).eval()
    old = layer.lora
    del old._modules["lora_dropout"]
    old.__dict__["dropout"] = 0.25  # the old layout
    again = pickle.loads(pickle.dumps(layer))
    assert isinstance(again.lora.lora_dropout, nn.Dropout) and again.lora.dropout == 0.25
    assert not again.lora.lora_dropout.training
    x = torch.randn(5, 16)
    assert_rel_close(again(x), _expected(again, x), 1e-5, "reloaded layer, eval")
    again.train()
    assert not torch.equal(again(x), again(x))


def test_a_base_gathered_by_its_own_hooks_runs():
    """A base whose weight is an empty placeholder outside its forward, filled by its own pre-forward hook and
    freed after (DeepSpeed ZeRO-3's partitioning) takes the base(x) + term path: the base-weight shape check that
    names a resized lm_head read the placeholder before that path and refused every forward. The result is the
    gathered layer's, output and gradients."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LinearWithLoRA(base, rank=2)
    nn.init.normal_(layer.lora.lora_B)
    full = base.weight.data.clone()
    x = torch.randn(3, 8, requires_grad=True)
    want = layer(x)
    want.square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora.lora_A, layer.lora.lora_B)]
    for t in (x, layer.lora.lora_A, layer.lora.lora_B):
        t.grad = None
    base.weight.data = torch.empty(0)  # partitioned
    base.register_forward_pre_hook(lambda m, a: setattr(m.weight, "data", full))
    base.register_forward_hook(lambda m, a, o: setattr(m.weight, "data", torch.empty(0)))
    assert not layer.fusable()
    got = layer(x)
    assert base.weight.shape == (0,)
    assert torch.equal(got, want)
    got.square().sum().backward()
    for t, g in zip((x, layer.lora.lora_A, layer.lora.lora_B), grads, strict=True):
        assert torch.equal(t.grad, g)


def test_a_real_base_wrapped_under_a_meta_device_context_draws_its_adapter():
    """``with torch.device("meta")`` (the default device of code that builds models empty) around the wrapping of
    a real base: the adapter lives on the base's device, and its draws were made on the default device, meta,
    then copied: "Cannot copy out of meta tensor". They are drawn on the CPU there: the same A as outside."""
    base = nn.Linear(8, 6)
    torch.manual_seed(3)
    want = LinearWithLoRA(base, rank=2).lora.lora_A
    torch.manual_seed(3)
    with torch.device("meta"):
        got = LinearWithLoRA(base, rank=2).lora.lora_A
    assert got.device.type == "cpu" and torch.equal(got, want)
