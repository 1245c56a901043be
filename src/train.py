"""Train: `python src/train.py method=thor model=qwen8b` — composes configs/train.yaml, runs tirl.train.run."""

from tirl.config import hydra_entry
from tirl.train import run

if __name__ == "__main__":
    hydra_entry("train", run)  # `method=thorr` → one sentence with the valid options, before Hydra composes
