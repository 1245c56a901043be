"""Evaluate: `python src/eval.py task=math bench=[math500,aime24] init_from=...` or `task=bfcl` — composes
configs/eval.yaml, runs tirl.evaluate.run."""

from tirl.config import hydra_entry
from tirl.evaluate import run

if __name__ == "__main__":
    hydra_entry("eval", run)
