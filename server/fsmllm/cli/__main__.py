"""``python -m fsmllm.cli``: the ``fsmllm`` command."""

import sys

from fsmllm.cli import main

sys.exit(main())
