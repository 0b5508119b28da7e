"""Fused Triton kernels of lora_fast, installed as ``lora_fast.kernels``.

No imports here. From the repository root a bare ``kernels`` is importable, and transformers imports such a package
when it looks for Hugging Face's ``kernels`` hub package (``is_kernels_available``). ``__version__`` is "0", below
every release of that package, so transformers finds it too old and does not use it: without a version,
transformers 5.0 to 5.8 parsed "N/A" and raised InvalidVersion (from the repository root, e.g. asking for
flash_attention_2); 5.23 counts a package without a version as absent. lora_fast imports the kernel modules by
their full names (``lora_fast.kernels.<module>``).
"""

__version__ = "0"  # not lora_fast's version: a sentinel below Hugging Face kernels' first release (see above)
