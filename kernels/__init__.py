"""Fused Triton kernels of lora_fast, installed as ``lora_fast.kernels``.

This file stays empty on purpose: no imports and no ``__version__``. From the repository root a bare ``kernels``
is importable, and transformers >= 5 imports such a package and treats one with ``__version__`` as Hugging Face's
``kernels`` hub package. lora_fast imports the kernel modules by their full names (``lora_fast.kernels.<module>``).
"""
