"""`opt_train.plot` moved to `opt_train.tools.plot`; this module keeps `python -m opt_train.plot` and users' imports
working as documented."""

from opt_train.tools.plot import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
