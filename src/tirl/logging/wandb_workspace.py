"""The W&B workspace every tirl project gets: the panels a researcher watches during tool-integrated RL.

``PANELS`` is plain data (testable offline, printed by ``scripts/make_wandb_workspace.py --dry-run``);
``build_workspace`` turns it into a ``wandb_workspaces`` Workspace, which ``save()`` creates on the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PanelSpec:
    section: str
    title: str
    metrics: tuple[str, ...] = ()       # exact metric keys, one line each
    metric_regex: str | None = None     # or every key matching this (per-group metrics such as lazy_ratio/*)


PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("Reward and accuracy", "Reward", ("train/reward_mean",)),
    PanelSpec("Reward and accuracy", "Accuracy", ("train/acc", "val/acc")),
    PanelSpec("Policy", "Entropy", ("train/entropy",)),
    PanelSpec("Policy", "Clip fraction", ("train/clipfrac_high", "train/clipfrac_low")),
    PanelSpec("Policy", "KL to reference", ("train/kl",)),
    PanelSpec("Rollouts", "Response length", ("train/response_len", "val/response_len")),
    PanelSpec("Rollouts", "Sandbox pass rate", ("train/sandbox_pass_rate",)),
    PanelSpec("Rollouts", "Function calls per sample", ("train/function_calls_per_sample",)),
    PanelSpec("Rollouts", "Lazy reasoning ratio", metric_regex=".*lazy_ratio.*"),
)


@dataclass
class WorkspaceSpec:
    entity: str | None
    project: str
    name: str = "tirl"
    panels: list[dict] = field(default_factory=lambda: [asdict(p) for p in PANELS])


def workspace_spec(project: str, entity: str | None = None, name: str = "tirl") -> WorkspaceSpec:
    return WorkspaceSpec(entity=entity, project=project, name=name)


def build_workspace(spec: WorkspaceSpec):
    """A ``wandb_workspaces.workspaces.Workspace`` for ``spec`` (call ``.save()`` to create it)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise RuntimeError(f"Creating a W&B workspace needs the wandb-workspaces package ({e}); "
                           "`pip install wandb-workspaces`, or use --dry-run to print the panels.") from None
    if not spec.entity:
        raise ValueError("A W&B workspace needs an entity; pass --entity or set WANDB_ENTITY.")
    sections: dict[str, list] = {}
    for p in spec.panels:
        plot = wr.LinePlot(title=p["title"], x="Step", y=list(p["metrics"]), metric_regex=p["metric_regex"],
                           smoothing_factor=0.6 if p["metrics"] and p["metrics"][0].startswith("train/") else None)
        sections.setdefault(p["section"], []).append(plot)
    return ws.Workspace(entity=spec.entity, project=spec.project, name=spec.name,
                        sections=[ws.Section(name=n, panels=panels, is_open=True) for n, panels in sections.items()])
