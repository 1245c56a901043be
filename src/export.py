"""Export: `python src/export.py ckpt=<run>/checkpoints/last.ckpt out=<dir> [merge_lora=false]` — composes
configs/export.yaml, runs tirl.export.run."""

from tirl.config import hydra_entry
from tirl.export import check_args, run

if __name__ == "__main__":
    hydra_entry("export", run, precheck=check_args)  # `ckt=…` → one sentence naming the keys
