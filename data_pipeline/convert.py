"""`python -m data_pipeline.convert`: the documented command, which users' scripts and job files
call; the stage itself is `data_pipeline.stages.convert`."""

from data_pipeline.stages.convert import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
