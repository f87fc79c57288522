"""`python -m opt_train.provenance RUN_DIR step=N [rank=R]`, the documented command: the
documents behind a step, with their text; the CLI is opt_train/tools/provenance.py."""

from opt_train.tools.provenance import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
