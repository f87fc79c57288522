"""`python -m opt_train.plot RUN_DIR... -o X.png`, the documented command; the CLI is
opt_train/tools/plot.py."""

from opt_train.tools.plot import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
