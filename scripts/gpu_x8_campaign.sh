#!/usr/bin/env bash
# One loan of the 8-GPU machine (nvidia-h200-x8): issue 8's learning-rate study on the 32x32 digits teacher, one
# run per GPU, then issue 9's sdxl-sim under FSDP2 on all 8 GPUs. Five calls to one warm machine, in this order:
#
#   bash scripts/gpu_x8_campaign.sh A|B|L|C|D|S|E
#
#   A: (carries .whlmin and .inc_a) installs pydantic into runs/site; keeps the first half of the Inception network.
#   B: (carries .whlmin and .inc_b) joins the Inception network and checks its SHA-1, writes the FID reference of the
#      1797 digits at 32x32, and starts `phase1` in its own process session (it outlives the call):
#        phase 1: digits32-{sim,sid,dmd,di} at lr 1e-4 and 1e-5, one run per GPU, FID-10k at step 0 and every 100
#                 steps (25.6 kimg). SIM/SiD get SIDSIM_S seconds, DMD/DI (5 fake updates a step, about twice the
#                 work per generator image) DMDDI_S, so all reach comparable kimg.
#        phase 2: on the four GPUs SIM/SiD free: SIM at lr 1e-4 with pseudo-Huber c = 4 and 32 (the presets' c = 1 was
#                 chosen on the 2-D ring; |y| grows with the square root of the dimension), and issue 7's training
#                 step compiled and eager on this H200 (onestep bench).
#   C: (carries .whl) installs diffusers and peft, builds the random-init SDXL pipeline on the CPU in the background,
#      waits WAIT_C seconds and brings back what the runs have written so far.
#   D: waits for both phases, evaluates every run's final EMA generator with `onestep eval` (FID-10k, seeds 0-9999,
#      one GPU each), writes 64 samples (seeds 0-63) of each, and brings everything back.
#   S: sdxl-sim on 8 GPUs under FSDP2 (scripts/sdxl_fsdp_batch.sh), per-GPU batch 16, 24, 28 until one fails.
# A follow-up on one H100 (two calls: A carrying only .inc_a, then E carrying .whlmin and .inc_b): SIM with c = 32
# at lr 1e-5, the run phase 2 had no GPU for, limited to the 1120 steps (286.7 kimg) of the c = 32 run at lr 1e-4
# rather than to seconds (another GPU, another speed).
# Everything lives under runs/x8 (git-ignored, so it stays on the warm machine between calls); results go to $OUT.
set -u
stage=$1
OUT=${OUT:-/tmp/x8-out}
R=runs/x8
export ONESTEP_HOME=$PWD/runs/onestep_home PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/runs/site:$PWD
# Eight processes with torch's default of one thread per core (128) drove the load to 373 and the GPUs to 0% during
# the first FID evaluation (its statistics run on the CPU): a share of the cores each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-16}
source "$(dirname "$0")/inception_halves.sh"
SIDSIM_S=${SIDSIM_S:-420}
DMDDI_S=${DMDDI_S:-840}
mkdir -p "$R/inception_parts" "$R/ref" "$R/evals" "$R/bench" "$R/grids" "$OUT"
install_wheels() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target runs/site "$1"/*.whl; }

distil() {  # gpu seconds objective lr name [--set ...]
    local gpu=$1 seconds=$2 objective=$3 lr=$4 name=$5; shift 5
    CUDA_VISIBLE_DEVICES=$gpu timeout -s TERM "$seconds" python3 -m onestep_cli distill --preset "digits32-$objective" \
        --out "$R/$name" --set train.lr="$lr" --set train.max_steps=1000000 --set train.checkpoint_every=100 \
        --set eval.metrics='[fid]' --set eval.ref=$R/ref/digits32-fid.npz --set eval.every_steps=100 \
        --set eval.at_start=true --set eval.num_samples=10000 --set eval.batch_size=500 "$@" >> "$R/$name.log" 2>&1
}
bench() {  # gpu name onestep-bench-options...
    local gpu=$1 name=$2; shift 2
    CUDA_VISIBLE_DEVICES=$gpu timeout -s TERM 400 python3 -m onestep_cli bench --json "$@" > "$R/bench/$name.json" \
        2> "$R/bench/$name.log"
}
phase1() {
    local gpu=0
    for lr in 1e-4 1e-5; do
        for o in sim sid; do (distil $gpu "$SIDSIM_S" $o $lr $o-lr$lr; phase2 $gpu) & gpu=$((gpu + 1)); done
        for o in dmd di; do distil $gpu "$DMDDI_S" $o $lr $o-lr$lr & gpu=$((gpu + 1)); done
    done
    wait
    echo "phases done $(date +%T)"
}
phase2() {  # gpu: the GPUs 0, 1, 4, 5 that SIM/SiD leave (in order of the loop above)
    case $1 in
        0) distil 0 "$((SIDSIM_S - 20))" sim 1e-4 sim-lr1e-4-c4 --set objective.huber_c=4 ;;
        1) distil 1 "$((SIDSIM_S - 20))" sim 1e-4 sim-lr1e-4-c32 --set objective.huber_c=32 ;;
        4) bench 4 sid-compiled --rows sid-cifar10 --compile --warmup 2 ;;
        5) bench 5 eager --rows sid-cifar10,dmd-cifar10,sample-cifar10
           bench 5 sample-compiled --rows sample-cifar10 --compile --channels-last ;;
    esac
}
inception_and_reference() {  # Join the Inception network's halves (the second carried now), then the FID reference.
    join_inception "$R/inception_parts"
    python3 -m onestep_cli.digits.images_npz --resolution 32 --out $R/ref/digits32.npz
    python3 -m onestep_cli eval $R/ref/digits32.npz --metrics fid --save-stats $R/ref/digits32-fid.npz --batch 500 \
        --json > $R/ref/digits32.json || exit 4
}
bring_back() {  # name
    tar czf "$OUT/$1.tar.gz" --ignore-failed-read $R/*/metrics.jsonl $R/*/stats.jsonl $R/*/config.yaml $R/*.log \
        $R/evals $R/bench $R/grids $R/phases.log
}

case $stage in
A)
    [ -d .whlmin ] && install_wheels .whlmin  # The H100 follow-up's first call leaves it to E (64 MiB a call).
    keep_first_half "$R/inception_parts"
    python3 -c 'import torch, pydantic; print(torch.__version__, pydantic.VERSION, torch.cuda.device_count(), "GPUs")'
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
    ;;
B)
    inception_and_reference
    bash "$0" L
    ;;
L)  # Start (or restart, after killing the runs) both phases in their own process session.
    pkill -KILL -f "[b]ash -c phase1"; pkill -KILL -f "[o]nestep_cli distill"; pkill -KILL -f "[o]nestep_cli bench"
    export -f distil bench phase1 phase2
    export R SIDSIM_S DMDDI_S
    setsid -f bash -c phase1 > $R/phases.log 2>&1 < /dev/null
    sleep 60
    tail -n 2 $R/*.log
    ;;
C)
    install_wheels .whl
    setsid -f python3 scripts/sdxl_step.py --out /tmp/sdxl --build-only > $R/sdxl-build.log 2>&1 < /dev/null
    sleep "${WAIT_C:-500}"
    tail -n 1 $R/*.log
    bring_back partial
    ;;
D)
    while ! grep -q "phases done" $R/phases.log; do sleep 5; done
    gpu=0
    for run in $(cd $R && ls -d */ | tr -d / | grep -- -lr); do
        (CUDA_VISIBLE_DEVICES=$gpu python3 -m onestep_cli eval $R/$run --metrics fid --num 10000 \
            --ref $R/ref/digits32-fid.npz --batch 500 --json > $R/evals/$run-fid.json
         CUDA_VISIBLE_DEVICES=$gpu python3 -m onestep_cli sample $R/$run --num 64 --out $R/grids/$run > /dev/null) &
        gpu=$(( (gpu + 1) % 8 ))
    done
    wait
    for f in $R/evals/*.json; do echo "$f $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['metrics'])" $f)"; done
    tail -n 3 $R/sdxl-build.log
    bring_back final
    ;;
E)
    install_wheels .whlmin
    inception_and_reference
    distil 0 480 sim 1e-5 sim-lr1e-5-c32 --set objective.huber_c=32 --set train.max_steps=1120
    python3 -m onestep_cli eval $R/sim-lr1e-5-c32 --metrics fid --num 10000 --ref $R/ref/digits32-fid.npz --batch 500 \
        --json > $R/evals/sim-lr1e-5-c32-fid.json
    tail -n 2 $R/sim-lr1e-5-c32.log
    tar czf "$OUT/followup.tar.gz" $R/sim-lr1e-5-c32/*.jsonl $R/sim-lr1e-5-c32/config.yaml $R/sim-lr1e-5-c32.log \
        $R/evals $R/ref/digits32.json
    ;;
S)
    for _ in $(seq 120); do grep -q "pipeline ready" $R/sdxl-build.log && break; sleep 2; done
    tail -n 2 $R/sdxl-build.log
    bash scripts/sdxl_fsdp_batch.sh /tmp/sdxl/pipeline 8 "${DEADLINE_S:-480}" 16 24 28 | tee "$OUT/sdxl8.md"
    tail -n 5 /tmp/sdxl-batch/*.log > "$OUT/sdxl8-logs.txt"
    ;;
*)
    echo "usage: $0 A|B|L|C|D|S|E" >&2; exit 2 ;;
esac
