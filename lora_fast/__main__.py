"""``python -m lora_fast``: the ``lora-fast`` command (``lora_fast.cli``), for environments without its script."""

import sys

from lora_fast.cli import main

sys.exit(main())
