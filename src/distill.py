"""D-CORE stage 1 self-distillation: `python src/distill.py input.path=... backend@backends.decomposer=http backends.decomposer.base_url=...`."""

import hydra
from omegaconf import DictConfig

from tirl.pipelines.chat import ChatConfigError
from tirl.pipelines.jobs import InputError, run_distill


@hydra.main(config_path="../configs", config_name="distill", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        return run_distill(cfg)["keep_rate"]
    except (InputError, ChatConfigError) as err:  # a user's mistake: one sentence, no traceback
        raise SystemExit(f"distill: {err}") from None


if __name__ == "__main__":
    main()
