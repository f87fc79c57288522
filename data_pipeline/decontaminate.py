"""`python -m data_pipeline.decontaminate`: the documented command, which users' scripts and
job files call; the stage itself is `data_pipeline.stages.decontaminate`."""

from data_pipeline.stages.decontaminate import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
