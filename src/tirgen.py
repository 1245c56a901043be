"""THOR TIRGen: `python src/tirgen.py input.path=... backend@backends.critic=http backends.critic.base_url=...`."""

import hydra
from omegaconf import DictConfig

from tirl.pipelines.chat import ChatConfigError
from tirl.pipelines.jobs import InputError, run_tirgen


@hydra.main(config_path="../configs", config_name="tirgen", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        return run_tirgen(cfg)["keep_rate"]
    except (InputError, ChatConfigError) as err:  # a user's mistake: one sentence, no traceback
        raise SystemExit(f"tirgen: {err}") from None


if __name__ == "__main__":
    main()
