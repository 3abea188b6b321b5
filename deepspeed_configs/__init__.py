"""DeepSpeed JSON files holding only the ZeRO stage and the precision (``zeroN_PRECISION.json``).

Batch sizes, accumulation and clipping are filled in from the training config
(``maskdm.pipeline.config.deepspeed_config``). Installed as package data, so the files are found
from a regular install too.
"""

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
