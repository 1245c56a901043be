"""Train: `python src/train.py method=thor model=qwen8b` — composes configs/train.yaml, runs tirl.train.run."""

import hydra
from omegaconf import DictConfig

from tirl.config import exit_on_bad_overrides, exit_on_config_error
from tirl.config.provenance import exit_on_provenance_flag
from tirl.train import run


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with exit_on_config_error():
        return run(cfg)


if __name__ == "__main__":
    exit_on_bad_overrides("train")  # `method=thorr` → one sentence with the valid options, before Hydra composes
    exit_on_provenance_flag("train")  # `--provenance`: which file set each value; prints and exits
    main()
