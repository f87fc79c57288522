"""`python -m opt_train.plan`, the documented command of the memory planner
(`opt_train.tools.plan`)."""

from opt_train.tools.plan import main

__all__ = ["cli", "main"]


def cli() -> None:
    """The `opt-train-plan` console script: pip's wrapper exits with `main()`'s return value,
    and `main` returns the Plan (callers use it), which would exit 1."""
    main()


if __name__ == "__main__":
    main()
