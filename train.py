"""Entry point: `python train.py [overrides]` or `torchrun ... train.py [overrides]`.

Hydra composes conf/train.yaml (+ groups such as `+model=opt-2.7b`) onto the typed schema in
opt_train/config/; the run itself lives in opt_train/train/trainer.py.
"""

import sys

import hydra
from omegaconf import DictConfig

from opt_train.config import register_configs
from opt_train.overrides import check_overrides

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from opt_train.launch import run

    run(cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
