"""`python -m data_pipeline`: run the configured chain (see data_pipeline/chain.py)."""

from data_pipeline.chain import main

if __name__ == "__main__":
    main()
