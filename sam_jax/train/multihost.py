"""``python -m sam_jax.train.multihost``: one process of a multi-process training job.

The same command on every host (only ``--process-id`` differs)::

    python -m sam_jax.train.multihost --coordinator-address HOST:PORT \\
        --num-processes N --process-id I -- <python -m sam_jax.train flags>

See `sam_jax.train.distributed.main` and docs/train.md ("Multi-host").
"""
import sys

from sam_jax.train.distributed import main

if __name__ == "__main__":
    sys.exit(main())
