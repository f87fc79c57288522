"""`data_pipeline.reddit` moved to `data_pipeline.stages.reddit`; this module keeps `python -m data_pipeline.reddit` and users' imports
working as documented."""

from data_pipeline.stages.reddit import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
