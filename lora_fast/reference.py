"""Plain-PyTorch definition of the LoRA linear map: the CPU fallback and the test oracle.

    y = x·W₀ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ

    x (..., K)    W₀ (N, K) nn.Linear layout, or (K, N) Conv1D layout (``fan_in_fan_out=True``)
    A (r, K)      B (N, r)       b (N,) or None      s = α/r (α/√r for rsLoRA, see ``lora_scaling``)

Dropout acts on the LoRA input only (as in the LoRA paper and PEFT). The keep-mask is either passed explicitly
(boolean, broadcastable to x — the kernels' own mask, so that a kernel can be compared exactly) or drawn from
torch's RNG. ``upcast=True`` computes everything in float64 and returns float64: the oracle for tests.
Both weight layouts are used through views (``weight.t()`` is a view), never a copied transpose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False where autocast does not exist (``meta``, which raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """s = α/r, or α/√r for rank-stabilised LoRA (Kalajdzievski 2023, as PEFT's ``use_rslora``)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_compute_dtype(x_dtype: torch.dtype, *adapter_dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the LoRA term outside autocast: x's — except fp16, whose range (65504) a GradScaler-sized dA or
    dB exceeds: there the adapters' dtype when it is wider (fp32 adapters, as LinearWithLoRA and PEFT keep them for a
    16-bit base; PEFT also computes the term in fp32 then). bf16 has fp32's range and stays bf16."""
    if x_dtype != torch.float16:
        return x_dtype
    for dtype in adapter_dtypes:
        x_dtype = torch.promote_types(x_dtype, dtype)
    return x_dtype


def lora_operands(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """(x, A, B) for the LoRA term: under autocast as given (F.linear picks the dtype), otherwise cast to
    ``lora_compute_dtype`` (differentiable casts: gradients reach fp32 adapters from bf16 or fp16 activations)."""
    if autocast_enabled(x.device.type):
        return x, lora_A, lora_B
    dtype = lora_compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    return x.to(dtype), lora_A.to(dtype), lora_B.to(dtype)


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    training: bool = True,
    fan_in_fan_out: bool = False,
    upcast: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference LoRA linear: returns y (..., N).

    Args:
        x: input (..., K).
        weight: frozen W₀, (N, K) or (K, N) when ``fan_in_fan_out``.
        bias: frozen b (N,) or None.
        lora_A: (r, K). lora_B: (N, r).
        scaling: s multiplying the LoRA term.
        dropout_p: dropout probability on the LoRA input; used only when ``training``.
        keep_mask: optional boolean keep-mask broadcastable to x; overrides the RNG. Kept elements are scaled by
            1/(1-p), as in ``nn.Dropout``.
        training: dropout is applied only in training mode.
        fan_in_fan_out: W₀ is in Conv1D layout (K, N).
        upcast: compute in float64 and return float64.
        generator: optional torch.Generator for the dropout mask.
    """
    if upcast:
        x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
        bias = bias.double() if bias is not None else None
    w = weight.t() if fan_in_fan_out else weight  # (N, K) view
    y = F.linear(x, w, bias)  # (..., N)

    # the LoRA input and adapters in the term's dtype (fp32 for fp16 x with fp32 adapters, dropout included, added
    # to y before one rounding back to fp16, as PEFT's LoRA layer does)
    x_l, lora_A, lora_B = lora_operands(x, lora_A, lora_B)
    x_d = x_l
    if training and dropout_p > 0.0:
        if keep_mask is None:
            # generator only when given: an explicit generator=None breaks torch.compile with dynamic shapes
            kw = {"generator": generator} if generator is not None else {}
            keep_mask = torch.rand(x.shape, device=x.device, **kw) >= dropout_p
        x_d = x_l * keep_mask.to(x_l.dtype) / (1.0 - dropout_p)
    elif keep_mask is not None and dropout_p > 0.0:
        raise ValueError("keep_mask was given but training=False: dropout is off in eval mode")
    xa = F.linear(x_d, lora_A)  # (..., r)
    return (y + scaling * F.linear(xa, lora_B)).to(y.dtype)  # (..., N), summed in the wider dtype


def lora_delta_weight(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """ΔW = s·B·A, (N, K), or its transpose (K, N) for the Conv1D layout, computed in fp32 or wider: in
    ``promote_types(dtype, float32)`` (fp64 for a fp64 base weight, fp32 for 16-bit ones), ``dtype`` defaulting to
    the adapters' dtype."""
    dtype = torch.promote_types(dtype or torch.promote_types(lora_A.dtype, lora_B.dtype), torch.float32)
    delta = scaling * (lora_B.to(dtype) @ lora_A.to(dtype))  # (N, K)
    return delta.t() if fan_in_fan_out else delta
