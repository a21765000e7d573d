"""``python -m lm_demo`` (with ``docs/examples`` on the path)."""

from .cli import main

main()
