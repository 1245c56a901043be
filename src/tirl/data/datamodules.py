"""Lightning DataModules: tokenised SFT batches (``tirl.data.sft_datamodule``), and endless seeded streams of RL
prompts (``tirl.data.rl_datamodule``); this module is the name configs give (``_target_: tirl.data.datamodules.…``).

Both take the DataConfig fields (``tirl.config.schema.DataConfig``) as constructor arguments, plus the
tokenizer and the few fields that belong to the model or method (``enable_thinking``, ``tool_prompt``, ``loss_on``);
an unknown
argument is an error naming the closest valid one.

Validation / test sets: ``val`` / ``test`` sources when given; otherwise, for a synthetic train source, the
first ``val_size`` (val) and next ``val_size`` (test) distinct held-out problems (a hash split that never
overlaps the train stream); for a file train source, ``val_size`` records held out from a seeded shuffle, at most a
fifth of the file (``heldout_count``).
"""

from tirl.data.rl_datamodule import PromptBatch, RLPromptDataModule
from tirl.data.sft_datamodule import SFTDataModule
from tirl.data.splits import heldout_count

__all__ = ["PromptBatch", "RLPromptDataModule", "SFTDataModule", "heldout_count"]
