"""D-CORE stage 1 self-distillation: `python src/distill.py input.path=... backend@backends.decomposer=http backends.decomposer.base_url=...`."""

from tirl.config import hydra_entry
from tirl.pipelines.jobs import run_distill

if __name__ == "__main__":
    hydra_entry("distill", lambda cfg: run_distill(cfg)["keep_rate"])
