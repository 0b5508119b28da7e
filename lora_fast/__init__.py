"""lora_fast: drop-in LoRA layers for PyTorch, with fused Triton kernels where they run.

    from lora_fast import apply_lora
    model = apply_lora(model, target_modules=["c_attn"], rank=8, alpha=16, dropout=0.1)

See README.md for the API overview.
"""

import lora_fast.ops  # noqa: F401  (registers torch.ops.lora_fast.*: torch.export.load of a program with LoRA layers)
from lora_fast.functional import lora_linear
from lora_fast.inject import (
    apply_lora,
    apply_lora_to_gpt2,
    count_parameters,
    find_target_modules,
    lora_layers,
    unwrap_model,
)
from lora_fast.layer import LinearWithLoRA, LoRALayer
from lora_fast.merge import disable_adapter, merge_and_unload, merge_lora, unload, unmerge_lora
from lora_fast.reference import lora_linear_ref, lora_scaling

__version__ = "0.1.0"

# Names living in modules that import optional dependencies (safetensors, peft, triton) are resolved lazily.
_LAZY = {
    "dropout_mask": "lora_fast.functional",
    "save_adapter": "lora_fast.adapter",
    "load_adapter": "lora_fast.adapter",
    "patch_peft": "lora_fast.peft_compat",
    "unpatch_peft": "lora_fast.peft_compat",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too: ``dir(lora_fast)`` and tab completion list save_adapter, load_adapter, ..."""
    return sorted({*globals(), *_LAZY})


__all__ = [
    *_LAZY,
    "LinearWithLoRA",
    "LoRALayer",
    "apply_lora",
    "apply_lora_to_gpt2",
    "count_parameters",
    "disable_adapter",
    "find_target_modules",
    "lora_layers",
    "lora_linear",
    "lora_linear_ref",
    "lora_scaling",
    "merge_and_unload",
    "merge_lora",
    "unload",
    "unmerge_lora",
    "unwrap_model",
]
