"""`data_pipeline.clean` moved to `data_pipeline.stages.clean`; this module keeps `python -m data_pipeline.clean` and users' imports
working as documented."""

from data_pipeline.stages.clean import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
