#!/usr/bin/env bash
# The largest per-GPU batch of sdxl-sim (random-init full-size SDXL, docs/scaling.md), through `onestep distill`.
#
#   bash scripts/sdxl_fsdp_batch.sh PIPELINE GPUS DEADLINE_S BATCH...
#
# PIPELINE comes from `python3 scripts/sdxl_step.py --out DIR --build-only` (DIR/pipeline, DIR/prompts.txt). Each
# per-GPU batch, in the order given, runs 4 steps on GPUS processes; once the step-4 tick is in stats.jsonl the run is
# killed (launcher and workers, by name: the workers outlive a killed launcher), so the 72 GB final checkpoint is
# not written (saving is measured in docs/scaling.md already). The search stops at the first batch that fails (out
# of memory), or when starting another would pass DEADLINE_S seconds.
set -u
pipeline=$1 gpus=$2 deadline=$(( SECONDS + $3 )); shift 3
prompts=$(dirname "$pipeline")/prompts.txt
for per_gpu in "$@"; do
    if (( SECONDS + 150 > deadline )); then echo "batch $per_gpu: not tried (deadline)"; break; fi
    run=/tmp/sdxl-batch/g$gpus-b$per_gpu
    rm -rf "$run"; mkdir -p "$(dirname "$run")"
    python3 -m onestep_cli distill --preset sdxl-sim --gpus "$gpus" --set teacher.path="$pipeline" \
        --set prompts.path="$prompts" --set train.batch_size=$(( gpus * per_gpu )) --set train.max_steps=100 \
        --set train.tick_every=2 --out "$run" > "$run.log" 2>&1 &
    pid=$!
    while kill -0 $pid 2> /dev/null; do
        if grep -q '"step": 4,' "$run/stats.jsonl" 2> /dev/null; then
            pkill -KILL -f "[m] onestep_cli distill"; break
        fi
        sleep 2
    done
    wait $pid 2> /dev/null
    # Killed processes free their GPU memory a while after they exit: wait, or the next batch looks too big.
    for _ in $(seq 60); do [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && break; sleep 1; done
    if grep -q '"step": 4,' "$run/stats.jsonl" 2> /dev/null; then
        python3 - "$run/stats.jsonl" "$gpus" "$per_gpu" <<'EOF'
import json, sys
ticks = [json.loads(line) for line in open(sys.argv[1])]
last = ticks[-1]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {last['seconds_per_step']:.2f} (steps 3-4) | "
      f"{int(sys.argv[2]) * int(sys.argv[3]) / last['seconds_per_step']:.2f} | {last['peak_memory_gb']:.1f} |")
EOF
    else
        echo "| $gpus | $per_gpu | failed: $(grep -m1 -o 'OutOfMemoryError.\{0,120\}\|Error:.\{0,160\}' "$run.log") |"
        break
    fi
done
