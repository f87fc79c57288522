"""`python -m opt_train.plan`, the documented command of the memory planner
(`opt_train.tools.plan`)."""

from opt_train.tools.plan import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
