"""`python -m data_pipeline.stages.dedup`, the same as `python -m data_pipeline.dedup`."""

from data_pipeline.stages.dedup.stage import main

if __name__ == "__main__":  # a spawned process re-imports this module and must not run it
    main()
