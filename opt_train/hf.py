"""`python -m opt_train.hf CHECKPOINT OUT_DIR`, and the public `load_hf` / `save_hf` that users'
scripts import from here. The code lives in `opt_train.model.hf` (conversion) and
`opt_train.tools.hf_export` (writing directories)."""

from opt_train.model.hf import load_hf
from opt_train.tools.hf_export import main, save_hf

__all__ = ["load_hf", "main", "save_hf"]

if __name__ == "__main__":
    main()
