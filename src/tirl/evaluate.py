"""Evaluation run: validate → model (HF id / local dir / tirl .ckpt via init_from) → generate → score → report.

    python src/eval.py task=bfcl model=qwen8b init_from=path/to/run.ckpt
    python src/eval.py task=math bench=[math500,aime24] task.n_samples=16 task.pass_k=[1,16]

Generation goes through the rollout backends (``rollout.backend``); math is tool-integrated with the sandbox and
THOR self-correction when ``rollout.self_correction.enabled=true``. Results land in ``<out_dir>/<task>_results.json``
and ``.md``, metrics go to the configured loggers (W&B: summary + per-item tables). Generations are cached per id
under ``out_dir`` (``task.out_dir``, default this run's directory), so pointing a rerun at the same out_dir resumes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tirl.benchmarks.task_config import MathTaskConfig, check_eval_sources, validate_eval
from tirl.config import (
    ConfigError,
    hydra_entry,
    register_loggers,
    task_wrapper,
)
from tirl.config.preflight import check_paths
from tirl.logging.quiet import quiet_library_notices

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto.")
    return name


@task_wrapper
def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the configured model on the configured task; return every reported metric as a float."""
    quiet_library_notices()
    typed, task = validate_eval(cfg)
    device = resolve_device(str(cfg.get("device", "auto")))
    check_paths(cfg, None)          # init_from
    check_eval_sources(task)        # every benchmark file, before the model loads
    from tirl.rollout.backend import check_backend_available

    check_backend_available(typed.rollout)

    import torch

    from tirl.benchmarks.generate import EvalGenerator, eval_rollout_config
    from tirl.benchmarks.results import flat_metrics, log_to_loggers, markdown_table, write_results
    from tirl.models.load import load_tokenizer
    from tirl.modules.policy import PolicyModule
    from tirl.rollout.backend import make_backend
    from tirl.tools.sandbox import sandbox_from_config
    from tirl.train import instantiate_group

    torch.manual_seed(cfg.seed)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    register_loggers(loggers)  # closed by task_wrapper even if evaluation raises
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    init_from = cfg.get("init_from")
    tokenizer = load_tokenizer(typed.model.name_or_path, trust_remote_code=typed.model.trust_remote_code)
    holder = PolicyModule(typed.method, typed.model, tokenizer, init_from)   # HF dir / .ckpt / LoRA, as training
    holder.configure_model()
    policy = holder.policy.to(device).eval()
    rollout = eval_rollout_config(typed.rollout, task.temperature, task.top_p)
    out_dir = Path(task.out_dir or cfg.paths.output_dir)
    generator = EvalGenerator(make_backend(rollout, policy, tokenizer), tokenizer, rollout,
                              typed.model.enable_thinking, typed.model.tool_prompt)
    settings = {"model": typed.model.name_or_path, "init_from": init_from, "seed": cfg.seed,
                "rollout": dataclasses.asdict(rollout), "tool_prompt": typed.model.tool_prompt,
                "enable_thinking": typed.model.enable_thinking}
    extra: dict[str, Any] = {}
    if isinstance(task, MathTaskConfig):
        from tirl.benchmarks.math_run import evaluate_math

        generator.sandbox = sandbox_from_config(typed.sandbox)
        try:
            results, tables = evaluate_math(task, generator, out_dir, settings)
        finally:
            generator.sandbox.close()
        columns = [f"avg@{task.n_samples}", *[f"pass@{k}" for k in task.pass_k], "best_of_n",
                   "mean_response_tokens", "code_pass_rate", "problems"]
    else:
        from tirl.benchmarks.bfcl_run import evaluate_bfcl_task, length_fn

        results, tables, extra = evaluate_bfcl_task(task, generator, out_dir / "bfcl", length_fn(tokenizer))
        columns = ["accuracy", "correct", "total"]
    metrics = flat_metrics(results, prefix=f"test/{task.name}")
    table = markdown_table({k: v for k, v in results.items() if k != "summary"}, columns)
    if "summary" in results:
        table += "\n" + markdown_table({"summary": results["summary"]}, sorted(results["summary"]))
    payload = {"task": dataclasses.asdict(task), "settings": settings, "results": results,
               "truncated_prompts": generator.truncated_prompts,
               "generated_tokens": generator.generated_tokens, **({"bfcl": extra} if extra else {})}
    json_path, md_path = write_results(out_dir, f"{task.name}_results", payload, table)
    log_to_loggers(loggers, metrics, tables)
    log.info("Results:\n%s\nWritten to %s and %s", table, json_path, md_path)
    if generator.truncated_prompts:
        log.warning("%d prompts were longer than rollout.max_prompt_tokens=%d and lost their beginning; raise it.",
                    generator.truncated_prompts, rollout.max_prompt_tokens)
    return metrics


def main() -> None:
    """Console script ``tirl-eval``: the same as ``python src/eval.py`` (needs a source checkout's configs/)."""
    hydra_entry("eval", run)
