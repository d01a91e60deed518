#!/usr/bin/env bash
# Create benchmarks/.peers-venv with the peers we compare against (MLflow, W&B offline) and
# the same framework versions as the project venv. Never installs anything into .venv.
#
#   bash benchmarks/setup_peers.sh          # idempotent: skips when already complete
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.peers-venv"
project_py="$here/../.venv/bin/python"
stamp="$venv/.complete-v2"
if [[ -f "$stamp" ]]; then
    echo "peers venv ready: $venv"; exit 0
fi
python3 -m venv "$venv"
pip="$venv/bin/pip"
# torch FIRST and pinned: 2.13.0 is a local CPU wheel here; an unpinned torch pulled in by a
# dependency would fetch a multi-GB CUDA build.
"$pip" install -q torch==2.13.0
# Same Lightning / Transformers as the project venv, so fit times compare like with like.
pin() { "$project_py" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
lightning_v="$(pin lightning || echo 2.6.6)"
transformers_v="$(pin transformers || true)"
accelerate_v="$(pin accelerate || true)"
extra=()
[[ -n "$transformers_v" ]] && extra+=("transformers==$transformers_v")
[[ -n "$accelerate_v" ]] && extra+=("accelerate==$accelerate_v")
"$pip" install -q "torch==2.13.0" "lightning==$lightning_v" mlflow wandb psutil requests \
    psycopg2-binary py-spy "${extra[@]}"
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
for name in ("torch", "lightning", "mlflow", "wandb", "transformers", "psycopg2-binary",
             "py-spy"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name}: not installed")
PY
touch "$stamp"
