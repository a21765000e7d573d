"""Run the language-model demo: ``python docs/examples/lm_demo/run.py --help``."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from lm_demo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
