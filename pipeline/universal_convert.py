"""``python -m maskdm.pipeline.universal_convert ARGS``: DeepSpeed's universal-checkpoint converter
(``deepspeed.checkpoint.ds_to_universal``, the same arguments) with every ``torch.load`` it makes
unpickling with ``weights_only=True`` (``checkpoint.safe_torch_load``: tensors, containers,
numbers, strings and DeepSpeed's few plain-data classes). The converter itself asks for
``weights_only=False``; a checkpoint folder is written by whoever can write the run folder or its
bucket, so a pickle in it that would run code stops the conversion instead (exit 1, the refusal in
its log). Its worker processes are forked, so they load the same way.
"""

from __future__ import annotations

import multiprocessing
import sys


def main(argv: list[str] | None = None) -> int:
    multiprocessing.set_start_method("fork", force=True)  # workers inherit the safe torch.load
    from deepspeed.checkpoint import ds_to_universal

    from .checkpoint import CheckpointError, safe_torch_load
    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    args = ds_to_universal.parse_arguments()
    try:
        with safe_torch_load():
            ds_to_universal.main(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
