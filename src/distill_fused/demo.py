"""``python -m distill_fused.demo``: the former name of ``python -m distill_fused`` (``cli.py``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
