#!/usr/bin/env bash
# Issue 3's fd_digits target with a longer EMA, and issue 5's FID-50k timing: two calls to one warm H100.
#
#   bash scripts/gpu_digits_ema.sh A|B|C
#
#   A: six 8x8 digits distillations share the GPU for RUN_SECONDS: sim, sid, dmd, di at the presets' batch 64 and
#      sim, sid at batch 256, all with a 20-kimg EMA half-life (the presets' 2 kimg averages only 31 steps), with
#      fd_digits and class_accuracy every 32 kimg. The first half of the Inception network comes along.
#   B: joins the Inception network (second half) and checks its SHA-1; times the whole FID-50k of a CIFAR-10
#      generator alone on the GPU (`onestep bench --rows fid50k-cifar10`); resumes the six runs for RESUME_SECONDS;
#      evaluates each final EMA generator and the teacher's Heun 35-NFE samples at seeds 0-999 (fid, fd_digits,
#      class_accuracy; as docs/results.md's issue-3 table); with the time left, times one-step sampling compiled.
#   C: DMD and DI at batch 256 for RUN_SECONDS (330 in the measured call), evaluated as in B.
# Runs live under runs/ema (git-ignored, kept on the warm machine between calls); results go to $OUT.
set -u
stage=$1
OUT=${OUT:-/tmp/ema-out}
R=runs/ema
export ONESTEP_HOME=$PWD/runs/onestep_home PYTHONUNBUFFERED=1
source "$(dirname "$0")/inception_halves.sh"
mkdir -p "$R/inception_parts" "$R/evals" "$OUT"
onestep() { python3 -m onestep_cli "$@"; }
metric() { python3 -c "import json,sys; r=json.load(sys.stdin); print(' '.join(f'{k}={v:.4f}' for k,v in r['metrics'].items()))"; }

distil() {  # objective batch seconds
    local every=$(( 32000 / $2 ))
    timeout -s TERM "$3" python3 -m onestep_cli distill --preset "digits-$1" --out "$R/$1-b$2" \
        --set train.batch_size="$2" --set train.ema_halflife_kimg=20 --set train.max_steps=1000000 \
        --set train.checkpoint_every="$every" --set eval.metrics='[fd_digits,class_accuracy]' \
        --set eval.every_steps="$every" --set eval.num_samples=1000 >> "$R/$1-b$2.log" 2>&1
}
all_runs() {  # seconds
    for o in sim sid dmd di; do distil $o 64 "$1" & done
    for o in sim sid; do distil $o 256 "$1" & done
    wait
}
evaluate() {  # sources under $R: fid, fd_digits and class_accuracy at seeds 0-999 (docs/results.md's protocol)
    for src in "$@"; do
        onestep eval $R/$src --num 1000 --metrics fid --ref $R/digits8-fid.npz --json > $R/evals/$src-fid.json
        onestep eval $R/$src --num 1000 --metrics fd_digits,class_accuracy --json > $R/evals/$src-digits.json
        echo "$src $(metric < $R/evals/$src-fid.json) $(metric < $R/evals/$src-digits.json)"
    done
}
bring_back() {  # name
    tar czf "$OUT/$1.tar.gz" --ignore-failed-read $R/*/metrics.jsonl $R/*/stats.jsonl $R/*/config.yaml $R/*.log $R/evals
}

case $stage in
A)
    keep_first_half "$R/inception_parts"
    all_runs "${RUN_SECONDS:-520}"
    tail -qn 1 $R/*/metrics.jsonl | cut -c 1-120
    bring_back stageA
    ;;
B)
    join_inception "$R/inception_parts"
    onestep bench --rows fid50k-cifar10 --json > "$OUT/fid50k-cifar10.json"; tail -n 20 "$OUT/fid50k-cifar10.json"
    all_runs "${RESUME_SECONDS:-170}"
    python3 -m onestep_cli.digits.images_npz --resolution 8 --out $R/digits8.npz
    onestep eval $R/digits8.npz --metrics fid --save-stats $R/digits8-fid.npz --batch 500 --json > $R/evals/ref8.json
    onestep sample $R/sid-b64 --teacher --steps 18 --num 1000 --out $R/teacher8-heun35 > /dev/null
    evaluate teacher8-heun35 sim-b64 sid-b64 dmd-b64 di-b64 sim-b256 sid-b256
    bring_back stageB
    left=$(( ${CALL_SECONDS:-575} - SECONDS ))
    if (( left > 60 )); then
        timeout "$left" python3 -m onestep_cli bench --rows sample-cifar10 --compile --json > "$OUT/sample-compile.json"
        tail -n 20 "$OUT/sample-compile.json"
    fi
    ;;
C)  # DMD and DI at batch 256 too (as the presets now ship), then their evaluation as in B.
    for o in dmd di; do distil $o 256 "${RUN_SECONDS:-330}" & done; wait
    evaluate dmd-b256 di-b256
    bring_back stageC
    ;;
*)
    echo "usage: $0 A|B|C" >&2; exit 2 ;;
esac
