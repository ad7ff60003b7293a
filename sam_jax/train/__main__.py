"""``python -m sam_jax.train ...`` (see sam_jax/train/cli.py)."""
from sam_jax.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
