"""`python -m opt_train.eval RUN_DIR [key=value ...]`, the documented command of downstream
evaluation (`opt_train.tools.evaluate`; docs/evaluation.md)."""

from opt_train.tools.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
