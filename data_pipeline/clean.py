"""`python -m data_pipeline.clean`: the documented command, which users' scripts and job files
call; the stage itself is `data_pipeline.stages.clean`."""

from data_pipeline.stages.clean import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
