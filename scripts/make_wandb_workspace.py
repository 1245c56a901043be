"""Create the tirl W&B workspace (reward, accuracy, entropy, clip fraction, KL, length, tool pass rate, lazy ratio).

    python scripts/make_wandb_workspace.py --project tirl --entity my-team
    python scripts/make_wandb_workspace.py --project tirl --dry-run      # print the panel spec, no network
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from tirl.logging.wandb_workspace import build_workspace, workspace_spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True)
    ap.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"))
    ap.add_argument("--name", default="tirl")
    ap.add_argument("--dry-run", action="store_true", help="print the workspace spec as JSON and exit")
    args = ap.parse_args(argv)
    spec = workspace_spec(args.project, args.entity, args.name)
    if args.dry_run:
        print(json.dumps(asdict(spec), indent=2))
        return 0
    workspace = build_workspace(spec)
    workspace.save()
    print(f"saved workspace '{spec.name}': {getattr(workspace, 'url', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
