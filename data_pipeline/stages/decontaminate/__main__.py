"""`python -m data_pipeline.stages.decontaminate`, the same as
`python -m data_pipeline.decontaminate`."""

from data_pipeline.stages.decontaminate.stage import main

if __name__ == "__main__":  # a spawned process re-imports this module and must not run it
    main()
