"""Method parts the RL module (``tirl.modules.grpo``) composes by config: THOR's episode filter and step level,
D-CORE's advantage shaping. A method is a preset over these (``configs/method/``), so any combination is a config
change. The math they use is in ``tirl.rl.core``."""
