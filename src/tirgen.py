"""THOR TIRGen: `python src/tirgen.py input.path=... backend@backends.critic=http backends.critic.base_url=...`."""

from tirl.config import hydra_entry
from tirl.pipelines.jobs import run_tirgen

if __name__ == "__main__":
    hydra_entry("tirgen", lambda cfg: run_tirgen(cfg)["keep_rate"])
