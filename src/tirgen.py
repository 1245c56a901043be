"""THOR TIRGen: `python src/tirgen.py input.path=... backend@backends.critic=http backends.critic.base_url=...`."""

import hydra
from omegaconf import DictConfig

from tirl.config import exit_on_bad_overrides, exit_on_config_error
from tirl.pipelines.jobs import run_tirgen


@hydra.main(config_path="../configs", config_name="tirgen", version_base="1.3")
def main(cfg: DictConfig) -> float:
    with exit_on_config_error():  # a user's mistake (input, backend config, sandbox): one sentence, exit 2
        return run_tirgen(cfg)["keep_rate"]


if __name__ == "__main__":
    exit_on_bad_overrides("tirgen")
    main()
