"""nn.Modules: ``LoRALayer`` (the adapter alone) and ``LinearWithLoRA`` (a frozen Linear/Conv1D plus the adapter).

Parameter names follow the LoRA tutorials and map 1:1 onto PEFT's adapter keys:
    lora_A (r, in)   ↔ ``<module>.lora_A.weight``        lora_B (out, r)  ↔ ``<module>.lora_B.weight``
Initialisation as in PEFT and the LoRA paper: A Kaiming-uniform(a=√5) (nn.Linear's default), B zeros, so a fresh
adapter leaves the base model's output unchanged.

Adapter dtype: a fp16/bf16 base gets fp32 adapter parameters (as PEFT's ``autocast_adapter_dtype=True``): AdamW
on half-precision LoRA weights loses updates. The fused kernels compute the LoRA term from the activations' dtype with
fp32 accumulation (dA, dB accumulated and written in fp32); the reference path in the activations' dtype, except
fp16 outside autocast, where it runs in fp32 as PEFT's does (``reference.lora_compute_dtype``: fp16's range).
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_fast.functional import device_mismatch, lora_linear, resolve_backend
from lora_fast.reference import lora_delta_weight, lora_operands, lora_scaling

try:  # transformers is a dependency, but keep the layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

LORA_BASE_TYPES = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
_PLAIN_FORWARDS = tuple(t.forward for t in LORA_BASE_TYPES)


def _global_hooks() -> bool:
    """Whether global module hooks are registered (``nn.modules.module.register_module_forward_hook``, ``..._pre_``,
    ``register_module_full_backward_hook``, ``..._pre_hook``): they must see the base module run."""
    mod = nn.modules.module
    return any(getattr(mod, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                      "_global_backward_hooks", "_global_backward_pre_hooks"))


def bound_own_forward(module: nn.Module, funcs: tuple = ()) -> bool:
    """Whether the instance's ``forward`` is one of ``funcs`` (default: its class's forward) bound to the module
    itself — what accelerate's ``remove_hook_from_module`` leaves behind."""
    f = module.__dict__.get("forward")
    return getattr(f, "__self__", None) is module and getattr(f, "__func__", None) in (funcs or (type(module).forward,))


def forward_replaced(module: nn.Module) -> bool:
    """Whether the instance holds a ``forward`` of its own (accelerate's hooks set one). Its class's forward bound to
    the module (``bound_own_forward``) runs what the class's does: no."""
    return "forward" in module.__dict__ and not bound_own_forward(module)


def calls_more_than_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's ``forward``: forward (pre-)hooks or full backward hooks
    on it, global module hooks, or a forward replaced on the instance (accelerate's offload hooks, ...)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or forward_replaced(module) or _global_hooks())


def plain_dropout(module: nn.Module) -> bool:
    """Whether calling the adapter's dropout module is ``F.dropout(x, p, training)``: an ``nn.Dropout`` (its class's
    forward) with no hooks — what the fused path's regenerated mask computes. A user's hook on it, or another
    module put in its place, makes the layer call the module itself (``LoRALayer.forward``), as PEFT does."""
    return type(module).forward is nn.Dropout.forward and not calls_more_than_forward(module)


def fusable_base(base: nn.Module) -> bool:
    """Whether the fused ``lora_linear`` computes exactly what calling ``base`` computes: a plain nn.Linear /
    Conv1D forward (a subclass that overrides it, e.g. a QAT Linear that fake-quantises its weight, does not
    qualify), nothing else running around it, and its weight materialised (not on the meta device)."""
    return (type(base).forward in _PLAIN_FORWARDS and not calls_more_than_forward(base)
            and base.weight.device.type != "meta")


def _check_hparams(rank, alpha, dropout) -> tuple[int, float, float]:
    """Checked (rank, alpha, dropout) as Python int/float: NumPy scalars (a sweep's ``np.arange``) are accepted
    and converted, as PEFT accepts them; bools, float ranks and strings are not."""
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if (isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha)
            or alpha <= 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    return int(rank), float(alpha), _check_dropout(dropout)


def _check_dropout(dropout) -> float:
    if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


_FLOAT_BASE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_base(base: nn.Module, own: bool = False) -> None:
    """Refuse bases a LoRA wrapper cannot compute with: quantised/integer weights, meta or offloaded weights.
    ``own``: a base the wrapper built itself, where the meta device can only be the caller's (``device="meta"``,
    ``with torch.device("meta")``: shape inference, or an empty init materialised later), as for nn.Linear."""
    w = base.weight
    if w.dtype not in _FLOAT_BASE_DTYPES:
        raise TypeError(f"LinearWithLoRA needs a floating-point base weight (fp32/fp16/bf16/fp64), got {w.dtype} "
                        f"in {type(base).__name__}: quantised bases are not supported")
    if (w.device.type == "meta" and not own) or hasattr(base, "_hf_hook"):
        raise ValueError(f"LinearWithLoRA cannot wrap a {type(base).__name__} whose weight is offloaded or on the "
                         "meta device (accelerate device_map/cpu_offload): load the model onto a real device first")


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class LoRALayer(nn.Module):
    """The low-rank adapter alone: forward(x) = scaling·(dropout(x)·Aᵀ)·Bᵀ.

    Args:
        in_features, out_features: sizes of the wrapped projection.
        rank: r > 0. alpha: α > 0; scaling = α/r (α/√r with ``use_rslora``).
        dropout: probability in [0, 1) on the adapter's input, active in training mode only.

    The dropout is a module, ``lora_dropout`` (an ``nn.Dropout``, as PEFT's): its ``p`` (also read and set as
    ``dropout``) and its own training flag decide, on the fused path too, so what finds dropout by module type
    reaches it — TRL's ``disable_dropout_in_model`` (p = 0), MC dropout (``model.eval()``, then ``.train()`` on the
    dropout modules).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        rank, alpha, dropout = _check_hparams(rank, alpha, dropout)
        self.in_features, self.out_features = in_features, out_features
        self.lora_dropout = nn.Dropout(dropout)
        self.rank, self.alpha = rank, float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(rank, self.alpha, self.use_rslora)
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))  # (r, K)
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))  # (N, r)
        self.reset_parameters()

    @property
    def dropout(self) -> float:
        """The dropout probability, ``lora_dropout.p``."""
        return self.lora_dropout.p

    @dropout.setter
    def dropout(self, p) -> None:
        self.lora_dropout.p = _check_dropout(p)

    def dropout_args(self) -> tuple[float, bool]:
        """(p, active) for ``lora_linear``: the dropout module's probability, checked (it may have been set on the
        module directly), and its own training flag."""
        p = self.lora_dropout.p
        return (p if type(p) is float and 0.0 <= p < 1.0 else _check_dropout(p)), self.lora_dropout.training

    def __setstate__(self, state) -> None:
        p = state.pop("dropout", 0.0)  # pickled before lora_dropout: dropout was a float attribute
        super().__setstate__(state)
        if "lora_dropout" not in self._modules:
            self.lora_dropout = nn.Dropout(p).train(self.training)

    def reset_parameters(self) -> None:
        """A Kaiming-uniform(a=√5), B zeros, drawn as PEFT draws them, so that one seed gives PEFT's adapter:
        ``update_layer`` builds ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (each drawing nn.Linear's own
        Kaiming-uniform init, on the default device in the default dtype), then draws A again; the result moves to
        the layer's device and dtype. A meta layer draws nothing."""
        nn.init.zeros_(self.lora_B)
        if self.lora_A.is_meta:
            return
        kw = {"dtype": torch.get_default_dtype()}
        if torch.empty(0).is_meta:  # a real layer built under `with torch.device("meta")`: nothing to draw there
            kw["device"] = "cpu"
        a = nn.init.kaiming_uniform_(torch.empty(self.rank, self.in_features, **kw), a=math.sqrt(5))
        nn.init.kaiming_uniform_(torch.empty(self.out_features, self.rank, **kw), a=math.sqrt(5))
        with torch.no_grad():
            self.lora_A.copy_(nn.init.kaiming_uniform_(a, a=math.sqrt(5)))

    def forward(self, x: torch.Tensor, *, cast_back: bool = True) -> torch.Tensor:
        """The LoRA term s·B·A·dropout(x), in x's dtype; ``cast_back=False`` leaves it in the dtype it was computed
        in (fp32 for fp16 x), for a caller that adds it to the base's output in that precision first, as PEFT does."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"input feature size mismatch: LoRALayer expects in_features={self.in_features} but "
                             f"the input's last dimension is {x.shape[-1] if x.dim() else 'missing'}")
        if not x.is_floating_point():  # A and B cast to an integer dtype would truncate to a wrong answer
            raise TypeError(f"LoRALayer expects a floating-point input, got {x.dtype}")
        off = device_mismatch(x, None, None, self.lora_A, self.lora_B)  # F.linear with meta A, B: garbage, no error
        if off is not None:
            raise RuntimeError(f"LoRALayer: {off}; put them on one device (a meta tensor was never loaded)")
        x_l, a, b = lora_operands(x, self.lora_A, self.lora_B)  # the reference's dtype rule (fp32 for fp16 x)
        if plain_dropout(self.lora_dropout):
            p, active = self.dropout_args()
            dropped = F.dropout(x_l, p, active)  # not the module: its inplace flag would overwrite x_l, maybe x
        else:  # hooks, or a module put in its place: called, as PEFT calls it
            dropped = self.lora_dropout(x_l)
        out = self.scaling * F.linear(F.linear(dropped, a), b)  # (..., N)
        return out if x_l.dtype == x.dtype or not cast_back else out.to(x.dtype)  # fp32 term for fp16 x: back

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling·B·A, (out, in), in fp32 (fp64 for fp64 adapters)."""
        return lora_delta_weight(self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}"
                + (", use_rslora=True" if self.use_rslora else ""))


class LinearWithLoRA(nn.Module):
    """Drop-in LoRA wrapper: y = base(x) + scaling·(dropout(x)·Aᵀ)·Bᵀ, with the base frozen.

    Two ways to build it::

        LinearWithLoRA(base, rank=8, alpha=16.0, dropout=0.0)          # wraps (does not copy) a Linear/Conv1D
        LinearWithLoRA(in_features, out_features, rank=8, alpha=16.0, bias=True, dropout=0.0)

    The fused ``lora_linear`` reads the base's weight and bias directly. When calling the base would do more than
    nn.Linear's / Conv1D's forward — a subclass overriding it (e.g. QAT fake-quantisation), forward hooks on the
    base or the adapter, accelerate's offload hooks — forward instead runs ``linear(x) + lora(x)``, as PEFT does.

    Attributes:
        linear: the frozen base module (nn.Linear or transformers' Conv1D, weight (in, out)).
        lora: the ``LoRALayer``.
        merged: whether ΔW is currently folded into ``linear.weight`` (then forward is the base alone).
        disabled: whether the adapter is switched off (forward is the base alone; ``lora_fast.disable_adapter``).
        backend: None (``LORA_FAST_BACKEND``/auto), "auto", "reference" or "triton".
    """

    disabled = False  # a class default: modules pickled before the attribute existed still load
    # transformers' save_pretrained (the Trainer's checkpoints) writes one name of each shared tensor and refuses a
    # sharing group none of whose names its models' ``_tied_weights_keys`` declare — a wrapped tied lm_head is
    # ``lm_head.linear.weight``, which GPT-2's "lm_head.weight" does not match. Declared here, the wrapped name is
    # the one left out when the base weight is shared (the other, e.g. ``transformer.wte.weight``, is written, and
    # loading it restores both); a base weight that is not shared is written as before. transformers reads only the
    # keys of a non-PreTrainedModel's mapping (4: ``_get_tied_weight_keys``; 5: the same, as a dict).
    _tied_weights_keys = {"linear.weight": "linear.weight"}

    def __init__(self, base_or_in_features=None, *args, **kwargs):
        super().__init__()
        given = [k for k in ("base", "in_features") if k in kwargs]  # the keyword forms of the first argument
        if base_or_in_features is None and len(given) == 1:
            base_or_in_features = kwargs.pop(given[0])
        elif given or base_or_in_features is None:
            also = " beside a first argument" if base_or_in_features is not None else ""
            raise TypeError("LinearWithLoRA needs one module to wrap (first argument or base=) or in_features (first "
                            "argument or in_features=, with out_features)"
                            + (f"; got {' and '.join(k + '=' for k in given)}{also}" if given else ""))
        if isinstance(base_or_in_features, nn.Module):
            names = ("rank", "alpha", "dropout", "use_rslora")
            base = base_or_in_features
        elif isinstance(base_or_in_features, numbers.Integral) and not isinstance(base_or_in_features, bool):
            names = ("out_features", "rank", "alpha", "bias", "dropout", "use_rslora")
            base_or_in_features, base = int(base_or_in_features), None
        else:
            raise TypeError(
                "LinearWithLoRA expects an nn.Linear / transformers Conv1D to wrap, or in_features (int), "
                f"got {type(base_or_in_features).__name__}"
            )
        if len(args) > len(names):
            raise TypeError(f"LinearWithLoRA takes at most {len(names)} positional arguments after the first")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"LinearWithLoRA got multiple values for argument {name!r}")
            kwargs[name] = value
        rank, alpha = kwargs.pop("rank", 8), kwargs.pop("alpha", 16.0)
        dropout, use_rslora = kwargs.pop("dropout", 0.0), kwargs.pop("use_rslora", False)
        self.backend = kwargs.pop("backend", None)
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if base is not None and (device is not None or dtype is not None):
            raise TypeError("LinearWithLoRA: device/dtype apply when it builds its own nn.Linear from in_features; "
                            "a wrapped base keeps its own: move or cast it (or the wrapper) with .to()")
        own = base is None
        if own:
            if "out_features" not in kwargs:
                raise TypeError("LinearWithLoRA(in_features, out_features, ...) is missing out_features")
            out_features = kwargs.pop("out_features")
            if isinstance(out_features, numbers.Integral) and not isinstance(out_features, bool):
                out_features = int(out_features)  # numpy ints too, as for rank
            if not isinstance(out_features, int) or out_features <= 0 or base_or_in_features <= 0:
                raise ValueError(f"in_features and out_features must be positive ints, got "
                                 f"{base_or_in_features!r}, {out_features!r}")
            base = nn.Linear(base_or_in_features, out_features, bias=kwargs.pop("bias", True),
                             device=device, dtype=dtype)
        if kwargs:
            raise TypeError(f"LinearWithLoRA got unexpected arguments {sorted(kwargs)}")
        if not isinstance(base, LORA_BASE_TYPES):
            raise TypeError(f"LinearWithLoRA wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}")
        _check_hparams(rank, alpha, dropout)
        _check_base(base, own)
        if self.backend is not None:
            resolve_backend(self.backend)  # an unknown name fails here, not at the first forward

        self.linear = base
        self.disabled = False  # on the instance too: torch.compile's guards then see one dict from the start
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D stores weight as (in, out)
        w = base.weight
        k_in, n_out = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.in_features, self.out_features = int(k_in), int(n_out)
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora = LoRALayer(self.in_features, self.out_features, rank, alpha, dropout, use_rslora,
                              device=w.device, dtype=_adapter_dtype(w.dtype))
        self._round_a_like_peft()
        self._weight_shape_kept = torch.Size(self._base_shape("weight"))
        self.merged = False

    # Read-through to the base, so code that inspects `module.weight` / `.bias` keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias") and "linear" in self.__dict__.get("_modules", {}):
            self._set_base_tensor(name, value)
        else:
            super().__setattr__(name, value)

    def _set_base_tensor(self, name: str, value) -> None:
        """``layer.weight = p`` (transformers' ``tie_weights`` ties a LoRA-wrapped ``lm_head`` so) sets the base's
        tensor — what the wrapper reads through — where the adapter still fits: same shape, layer not merged. It was
        a bare ``KeyError: "attribute 'weight' already exists"`` (PEFT's layers fail alike)."""
        old = getattr(self.linear, name)
        shape = None if value is None else tuple(value.shape)
        fits = None if old is None else self._base_shape(name)
        if shape != fits:  # also the same tensor resized in place (transformers 5)
            raise ValueError(self._misfit(f"the base {name} set", shape, fits))
        if value is old:
            return
        if self.merged:
            raise RuntimeError(f"LinearWithLoRA: cannot replace the base {name} of a merged layer (it holds W₀ + ΔW "
                               "and unmerging subtracts ΔW from it); unmerge first (lora_fast.unmerge_lora)")
        setattr(self.linear, name, value)

    def _base_shape(self, name: str) -> tuple[int, ...]:
        """The shape of the base's ``weight``/``bias`` that the adapter was built for (the adapter's own sizes:
        transformers' weight tying sets ``out_features`` on a resized output layer, on this wrapper too)."""
        k, n = self.lora.in_features, self.lora.out_features
        return {"weight": (k, n) if self.fan_in_fan_out else (n, k), "bias": (n,)}[name]

    @property
    def _weight_shape(self) -> torch.Size:
        """``_base_shape("weight")``, kept at construction (the fused forward compares it on every call); computed
        for a layer pickled before it was kept."""
        return self.__dict__.get("_weight_shape_kept") or torch.Size(self._base_shape("weight"))

    def _misfit(self, what: str, shape, fits) -> str:
        has = f" has shape {shape}" if shape is not None else ""
        return (f"LinearWithLoRA: {what}{has}, the layer was built for {fits}: its adapter (lora_A "
                f"{tuple(self.lora.lora_A.shape)}, lora_B {tuple(self.lora.lora_B.shape)}) does not fit it. "
                "resize_token_embeddings() with a LoRA-wrapped lm_head: resize before apply_lora/load_adapter (or "
                "leave lm_head out of target_modules)")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def scaling(self) -> float:
        return self.lora.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            if self.merged and self.disabled:  # ΔW is inside W₀: the base alone is not computable here
                raise RuntimeError("LinearWithLoRA: the adapter is disabled but merged into the base weight (merged "
                                   "inside disable_adapter); unmerge it (lora_fast.unmerge_lora) to run the base")
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                raise ValueError(f"input feature size mismatch: the layer expects in_features={self.in_features} "
                                 f"but the input's last dimension is {x.shape[-1] if x.dim() else 'missing'}")
            if (self.merged and self.training and torch.is_grad_enabled() and self.lora.lora_A.requires_grad
                    and not torch.compiler.is_compiling()):  # a warning inside a traced graph: fullgraph fails
                warnings.warn("LinearWithLoRA: a training-mode forward of a merged layer: the adapter gets no "
                              "gradient (its term is inside the frozen W₀); unmerge first (lora_fast.unmerge_lora), "
                              "or, for inference, call model.eval() (apply_lora's layers start in training mode, "
                              "as PEFT's)", stacklevel=2)
            return self.linear(x)
        if not self.fusable():
            # the base's own forward (a subclass's computation, hooks, accelerate's weight restoring) must run:
            # base(x) + the adapter's term, computed as PEFT computes it
            if resolve_backend(self.backend) == "triton":
                raise RuntimeError(f"backend='triton' cannot fuse this layer: calling its {type(self.linear).__name__}"
                                   " base does more than nn.Linear/Conv1D's forward (an overriding subclass, hooks, "
                                   "offloaded weights); use backend='auto' (base(x) + LoRA term, as PEFT)")
            y = self.linear(x)
            if not isinstance(y, torch.Tensor):  # e.g. Llama 4's router, an nn.Linear returning (scores, logits)
                raise TypeError(f"LinearWithLoRA: the wrapped {type(self.linear).__name__} returns "
                                f"{type(y).__name__}, not a tensor, so no LoRA term can be added to it; leave this "
                                "module out of target_modules")
            if y.shape[-1] != self.lora.out_features:  # the base resized under the adapter
                raise ValueError(self._misfit(f"the base's output ({y.shape[-1]} features)", None,
                                              self._base_shape("weight")))
            term = self.lora(x, cast_back=False)  # an fp32 term (fp16 x) is added in fp32, rounded once, as PEFT
            return (y + term).to(y.dtype)  # .to: no copy when the dtypes already agree
        w = self.linear.weight
        if w.shape != self._weight_shape:  # resized in place under the adapter (transformers 5's tied lm_head)
            raise ValueError(self._misfit("the base weight", tuple(w.shape), self._base_shape("weight")))
        p, active = self.lora.dropout_args()
        return lora_linear(
            x, self.linear.weight, self.linear.bias, self.lora.lora_A, self.lora.lora_B, self.lora.scaling,
            dropout_p=p, training=active, fan_in_fan_out=self.fan_in_fan_out,
            backend=self.backend,
        )

    def fusable(self) -> bool:
        """Whether ``lora_linear`` on the base's tensors computes what calling the base and the adapter computes
        (``fusable_base``, and no hooks on the adapter nor on its dropout module, ``plain_dropout``); otherwise
        forward runs ``linear(x) + lora(x)``."""
        return (fusable_base(self.linear) and not calls_more_than_forward(self.lora)
                and plain_dropout(self.lora.lora_dropout))

    @torch.no_grad()
    def merge_weights(self, safe_merge: bool = False) -> None:
        """W₀ ← W₀ + ΔW (computed in fp32 — fp64 for a fp64 W₀ — and stored in W₀'s dtype). Merging a merged layer
        warns and does nothing. ``safe_merge`` (PEFT's flag): check the merged weight for inf/NaN first and raise
        ``ValueError`` without touching W₀ if it has any (a diverged adapter, or W₀+ΔW past fp16's range)."""
        if self.merged:
            warnings.warn("LinearWithLoRA.merge_weights: already merged, nothing done", stacklevel=2)
            return
        self.linear.weight.copy_(self.merged_weight(safe_merge))
        self.merged = True
        # what was added, for unmerge: an optimizer step (or a load) while merged changes A and B, and subtracting
        # the new ΔW would corrupt W₀ (PEFT has that gap); r·(K+N) elements, the adapter's own size
        self._merged_adapter = (self.lora.lora_A.detach().clone(), self.lora.lora_B.detach().clone(),
                                self.lora.scaling)

    @torch.no_grad()
    def merged_weight(self, safe_merge: bool = False) -> torch.Tensor:
        """W₀ + ΔW as ``merge_weights`` would store it (a new tensor; W₀ is not touched). ``safe_merge``: raise
        ``ValueError`` if it has inf/NaN entries — what ``merge_lora(safe_merge=True)`` checks on every layer before
        merging any. On a merged layer: a copy of the weight, which already holds ΔW."""
        w = self.linear.weight
        if self.merged:
            return w.detach().clone()
        delta = lora_delta_weight(self.lora.lora_A, self.lora.lora_B, self.lora.scaling, self.fan_in_fan_out,
                                  dtype=w.dtype)  # fp32, or fp64 for a fp64 base
        merged = (w.to(delta.dtype) + delta.to(w.device)).to(w.dtype)
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError("LinearWithLoRA.merge_weights(safe_merge=True): the merged weight has inf/NaN "
                             "entries (the adapter or W₀+ΔW is not finite in the base's dtype); nothing merged")
        return merged

    @torch.no_grad()
    def unmerge_weights(self) -> None:
        """W₀ ← W₀ − ΔW, with the ΔW that was merged (A, B and scaling as they were then: an optimizer step while
        merged does not leak into W₀). Unmerging an unmerged layer warns and does nothing. The base weight comes
        back up to one rounding of W₀+ΔW away from the original, in any dtype (fp32 too: W₀+ΔW−ΔW is not W₀ bit
        for bit), as in PEFT; an entry that overflowed in the merge (fp16 without ``safe_merge``) stays inf."""
        if not self.merged:
            warnings.warn("LinearWithLoRA.unmerge_weights: not merged, nothing done", stacklevel=2)
            return
        w = self.linear.weight
        a, b, scaling = getattr(self, "_merged_adapter", None) or (self.lora.lora_A, self.lora.lora_B,
                                                                    self.lora.scaling)  # merged before it existed
        delta = lora_delta_weight(a.to(w.device), b.to(w.device), scaling, self.fan_in_fan_out, dtype=w.dtype)
        w.copy_((w.to(delta.dtype) - delta).to(w.dtype))
        self.merged = False
        self._merged_adapter = None

    def merged_base(self) -> nn.Module:
        """The base module with ΔW folded in (merges if needed): what ``merge_and_unload`` puts back."""
        if not self.merged:
            self.merge_weights()
        return self.linear

    def reset_parameters(self) -> None:
        self.lora.reset_parameters()
        self._round_a_like_peft()

    def _round_a_like_peft(self) -> None:
        """PEFT's A of a fp16/bf16 base passes through the base's dtype (moved to the base's device and dtype, then
        back to fp32 by ``autocast_adapter_dtype``): rounded alike, one seed gives PEFT's numbers there too."""
        half = self.linear.weight.dtype
        if half in (torch.float16, torch.bfloat16) and not self.lora.lora_A.is_meta:
            with torch.no_grad():
                self.lora.lora_A.copy_(self.lora.lora_A.to(half))

    def extra_repr(self) -> str:
        return f"merged={self.merged}, fan_in_fan_out={self.fan_in_fan_out}"
