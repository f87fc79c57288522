"""`data_pipeline.merge` moved to `data_pipeline.stages.merge`; this module keeps `python -m data_pipeline.merge` and users' imports
working as documented."""

from data_pipeline.stages.merge import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
