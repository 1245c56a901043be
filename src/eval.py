"""Evaluate: `python src/eval.py data=bfcl method=dcore init_from=...` — composes configs/eval.yaml, runs tirl.evaluate.run."""

import hydra
from omegaconf import DictConfig

from tirl.config import exit_on_bad_overrides, exit_on_config_error
from tirl.evaluate import run


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    with exit_on_config_error():
        return run(cfg)


if __name__ == "__main__":
    exit_on_bad_overrides()
    main()
