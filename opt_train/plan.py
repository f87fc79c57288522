"""`opt_train.plan` moved to `opt_train.tools.plan`; this module keeps `python -m opt_train.plan` and users' imports
working as documented."""

from opt_train.tools.plan import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
