"""Export: `python src/export.py ckpt=<run>/checkpoints/last.ckpt out=<dir> [merge_lora=false]` — composes
configs/export.yaml, runs tirl.export.run."""

import hydra
from omegaconf import DictConfig

from tirl.config import exit_on_config_error
from tirl.export import check_args, run


@hydra.main(config_path="../configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> str:
    with exit_on_config_error():
        return run(cfg)


if __name__ == "__main__":
    with exit_on_config_error():
        check_args()   # `ckt=…` → one sentence naming the keys, before Hydra's advice to append it with `+`
    main()
