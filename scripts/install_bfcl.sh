#!/usr/bin/env bash
# Install bfcl-eval (official BFCL data + checkers) without letting it downgrade numpy.
#
# Why not `pip install bfcl-eval`: it pins numpy==1.26.4, while the pyarrow that `datasets` pulls needs
# numpy>=2, and it drags in sentence-transformers/faiss/vllm-era pins we never use. Its checkers run fine on
# numpy 2. So we install it with --no-deps and add exactly what `import bfcl_eval...ast_checker` needs:
# importing the AST checker imports bfcl_eval.constants.model_config, which imports EVERY model handler,
# hence the API SDKs below (found by importing until nothing was missing). The multi-turn backends used by
# BFCLv3 (file system, trading, travel, ...) need only the standard library and mpmath.
#
# Idempotent: exits early when the checkers already import. Uses ${PYTHON:-python}.
# pip will still print "bfcl-eval requires numpy==1.26.4 ..." as a conflict: that is expected.
set -euo pipefail

PY="${PYTHON:-python}"
BFCL_VERSION="2026.3.23"
# Pins match bfcl-eval's own metadata where it pins (tree-sitter grammars must match the 0.21 API).
CHECKER_DEPS=(
    "tree-sitter==0.21.3" "tree-sitter-java==0.21.0" "tree-sitter-javascript==0.21.4"
    "mpmath" "filelock" "overrides" "python-dotenv" "tenacity" "requests" "tqdm" "pydantic>=2.8.2"
    "openai>=1.86.0" "anthropic>=0.75.0" "mistralai==1.7.0" "cohere==5.18.0" "google-genai>=1.52.0"
    "writer-sdk>=2.1.0" "boto3" "qwen-agent" "soundfile" "datamodel-code-generator==0.25.7"
)

checkers_import() {
    BFCL_PROJECT_ROOT="${BFCL_PROJECT_ROOT:-${TMPDIR:-/tmp}/bfcl_project_root}" "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md
from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker  # noqa: F401
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker  # noqa: F401
from bfcl_eval.model_handler.utils import default_decode_ast_prompting  # noqa: F401
assert md.version("bfcl-eval") == "2026.3.23"
EOF
}

if checkers_import; then
    echo "bfcl-eval ${BFCL_VERSION} already importable; nothing to do."
    exit 0
fi

versions() { "$PY" -c "import importlib.metadata as m
for d in ('numpy', 'torch'):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, 'absent')"; }
before="$(versions)"

# Refuse to go on if the dependency list would replace numpy or bring in (a CUDA) torch.
plan="$("$PY" -m pip install --dry-run "${CHECKER_DEPS[@]}" 2>/dev/null | grep '^Would install' || true)"
if echo "$plan" | grep -qE ' (torch|numpy|nvidia-[a-z0-9-]+)-[0-9]'; then
    echo "install_bfcl.sh: refusing, the checker deps would change numpy/torch: $plan" >&2
    exit 1
fi

"$PY" -m pip install -q --no-deps "bfcl-eval==${BFCL_VERSION}"
"$PY" -m pip install -q "${CHECKER_DEPS[@]}"

after="$(versions)"
if [ "$before" != "$after" ]; then
    echo "install_bfcl.sh: numpy/torch changed during install (before: $before; after: $after)" >&2
    exit 1
fi
if ! checkers_import; then
    echo "install_bfcl.sh: bfcl-eval installed but its checkers still fail to import; run" >&2
    echo "  $PY -c 'from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker' to see why." >&2
    exit 1
fi
echo "bfcl-eval ${BFCL_VERSION} installed; checkers import with: $(echo "$after" | tr '\n' ' ')"
