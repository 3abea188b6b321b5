"""``python -m maskdm``: the same entry point as the ``maskdm`` command."""

import sys

from maskdm.pipeline.cli import main

sys.exit(main())
