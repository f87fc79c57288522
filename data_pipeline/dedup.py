"""`python -m data_pipeline.dedup`, the documented command: the stage lives in
`data_pipeline.stages.dedup`."""

from data_pipeline.stages.dedup import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
