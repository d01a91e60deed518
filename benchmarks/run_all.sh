#!/usr/bin/env bash
# Run every benchmark (figures 1-7) and render benchmarks/results/REPORT.md.
#
#   bash benchmarks/run_all.sh            # full sizes (~20 min on 2 cores)
#   bash benchmarks/run_all.sh --quick    # small sizes (a few minutes)
#
# Peers (MLflow, W&B, Lightning/Transformers for them) live in benchmarks/.peers-venv, made by
# setup_peers.sh; nothing is installed into the project venv. PostgreSQL figures use
# $BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test): each script creates
# its own database there and drops it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
suffix=""
if [[ "${1:-}" == "--quick" ]]; then quick=(--quick); suffix=_quick; fi
P=.venv/bin/python
Q=benchmarks/.peers-venv/bin/python
mkdir -p benchmarks/results
log=benchmarks/results/run_all$suffix.log
: > "$log"
step() {
    local t0=$SECONDS
    echo "=== $* (load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$log"
    if "$@" 2>&1 | grep --line-buffered -v -E "Tip: For seamless|GPU available|TPU available|stopped: .max_|View (run|experiment) |Creating it" | tee -a "$log"; then
        echo "=== done in $((SECONDS - t0))s" | tee -a "$log"
    else
        echo "=== FAILED after $((SECONDS - t0))s: $*" | tee -a "$log"
        failed=$((failed + 1))
    fi
}
start=$SECONDS
failed=0
bash benchmarks/setup_peers.sh | tee -a "$log"
step $P benchmarks/bench_coldstart.py "${quick[@]}"
step $P benchmarks/bench_sweep.py "${quick[@]}"
step $P benchmarks/bench_server.py "${quick[@]}"
step $P benchmarks/micro_heartbeat.py "${quick[@]}"
step $P benchmarks/bench_endwait.py "${quick[@]}"
step $P benchmarks/bench_upload.py "${quick[@]}"
step $P benchmarks/bench_checkpoint.py "${quick[@]}"
step $Q benchmarks/bench_checkpoint.py --variants none,mlflow,wandb-offline "${quick[@]}"
fit=(none,noop-callback,chronicle-embedded,chronicle-http)
step $P benchmarks/bench_training.py --framework lightning --variants "${fit[@]}" "${quick[@]}"
step $P benchmarks/bench_training.py --framework lightning --variants "${fit[@]}" --width 1024 --steps 300 --tag w1024 "${quick[@]}"
step $Q benchmarks/bench_training.py --framework lightning --variants none,mlflow "${quick[@]}"
step $P benchmarks/bench_training.py --framework hf --variants "${fit[@]}" "${quick[@]}"
step $P benchmarks/bench_training.py --framework hf --variants "${fit[@]}" --width 1024 --steps 300 --tag w1024 "${quick[@]}"
step $Q benchmarks/bench_training.py --framework hf --variants none,mlflow "${quick[@]}"
rm -rf benchmarks/.work/data
$P benchmarks/report.py "${quick[@]}" > benchmarks/results/REPORT$suffix.md
echo "all figures in $((SECONDS - start))s ($failed step(s) failed); table: benchmarks/results/REPORT$suffix.md" | tee -a "$log"
exit $((failed > 0))
