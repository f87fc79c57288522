"""`data_pipeline.dedup` moved to `data_pipeline.stages.dedup`; this module keeps `python -m data_pipeline.dedup` and users' imports
working as documented."""

from data_pipeline.stages.dedup import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
