"""`python -m data_pipeline.merge`: the documented command, which users' scripts and job files
call; the stage itself is `data_pipeline.stages.merge`."""

from data_pipeline.stages.merge import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
