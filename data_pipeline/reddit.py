"""`python -m data_pipeline.reddit`: the documented command, which users' scripts and job files
call; the stage itself is `data_pipeline.stages.reddit`."""

from data_pipeline.stages.reddit import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
