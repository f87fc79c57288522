"""`data_pipeline.tokenize` moved to `data_pipeline.stages.tokenize`; this module keeps `python -m data_pipeline.tokenize` and users' imports
working as documented."""

from data_pipeline.stages.tokenize import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
