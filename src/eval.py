"""Evaluate: `python src/eval.py task=math bench=[math500,aime24] init_from=...` or `task=bfcl` — composes
configs/eval.yaml, runs tirl.evaluate.run."""

import hydra
from omegaconf import DictConfig

from tirl.config import exit_on_bad_overrides, exit_on_config_error
from tirl.evaluate import run


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    with exit_on_config_error():
        return run(cfg)


if __name__ == "__main__":
    exit_on_bad_overrides("eval")
    main()
