"""``python -m lora_fast``: the ``lora-fast`` command (``lora_fast.cli``), for environments without its script."""

from lora_fast.cli import console_main

console_main()
