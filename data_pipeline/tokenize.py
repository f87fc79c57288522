"""`python -m data_pipeline.tokenize`: the documented command, which users' scripts and job files
call; the stage itself is `data_pipeline.stages.tokenize`."""

from data_pipeline.stages.tokenize import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
