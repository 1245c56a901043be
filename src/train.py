"""Train: `python src/train.py method=thor model=qwen8b` — composes configs/train.yaml, runs tirl.train.run."""

from tirl.train import main

if __name__ == "__main__":
    main()   # `method=thorr` → one sentence with the valid options before Hydra composes; `--provenance` prints sources
