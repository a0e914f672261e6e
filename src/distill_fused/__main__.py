"""``python -m distill_fused``: the self-check and timing of ``cli.py`` (``--help`` says all)."""

from .cli import main

raise SystemExit(main())
