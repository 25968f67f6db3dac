#!/usr/bin/env bash
# The GPU campaign behind docs/results.md (issues 3 and 8), in three calls of at most 10 minutes to one warm machine.
#
#   bash scripts/gpu_digits_campaign.sh A|B|C
#
# Everything lives under runs/campaign (git-ignored, so it stays on the machine between calls); what a call brings
# back goes to $OUT. The 87 MB Inception FID network is larger than one call may carry (64 MB), so it travels in two
# halves (`split -n 2` of default_1.pt into .inc_a/ and .inc_b/, one carried per call) that call B joins and checks
# against its SHA-1; docs/results.md says how.
#   A: train the 32x32 digits teacher (7 min, bf16) while SIM/SiD/DMD/DI distil the shipped 8x8 teacher.
#   B: FID reference statistics; FID of the 8x8 students and teacher (issue 3); the teacher's 35-NFE FID-10k and
#      eight 32x32 distillations (4 objectives x lr 1e-4, 1e-5) with FID-10k during training (issue 8).
#   C: the same eight commands again: they resume from their checkpoints and continue (run it as often as the budget
#      allows). Eight processes share the GPU; Inception at eval.batch_size 1000 in all eight ran out of memory on an
#      H100, 200 fits.
set -u
stage=$1
OUT=${OUT:-/tmp/campaign-out}
R=runs/campaign
export ONESTEP_HOME=$PWD/runs/onestep_home PYTHONUNBUFFERED=1
source "$(dirname "$0")/inception_halves.sh"
RUN_SECONDS=${RUN_SECONDS:-400}  # Each training command gets this long, then SIGTERM: checkpoint and exit 0.
mkdir -p "$R/ref" "$R/inception_parts" "$OUT"
onestep() { python3 -m onestep_cli "$@"; }
metric() { python3 -c "import json,sys; r=json.load(sys.stdin); print(' '.join(f'{k}={v:.4f}' for k,v in r['metrics'].items()))"; }

distil32() {  # objective lr
    timeout -s TERM "$RUN_SECONDS" python3 -m onestep_cli distill --preset "digits32-$1" --out "$R/d32-$1-lr$2" \
        --set teacher.path=$R/teacher32/final --set train.lr="$2" --set train.max_steps=100000 \
        --set train.checkpoint_every=100 --set eval.metrics='[fid]' --set eval.ref=$R/ref/digits32-fid.npz \
        --set eval.every_steps=100 --set eval.num_samples=10000 --set eval.batch_size=200 \
        >> "$R/d32-$1-lr$2.log" 2>&1
}

case $stage in
A)
    keep_first_half "$R/inception_parts"
    python3 -m onestep_cli.digits.images_npz --resolution 32 --out $R/ref/digits32.npz
    python3 -m onestep_cli.digits.images_npz --resolution 8 --out $R/ref/digits8.npz
    python3 scripts/train_digits_teacher.py --out $R/teacher32 --resolution 32 --channel-mult 1,2,2,2 \
        --attn-resolutions 8 --precision bf16 --lr-rampup-kimg 50 --max-kimg 100000 --minutes 7 \
        > $R/teacher32.log 2>&1 &
    for o in sim sid dmd di; do
        timeout -s TERM 460 python3 -m onestep_cli distill --preset digits-$o --out $R/d8-$o \
            --set train.max_steps=100000 --set train.checkpoint_every=500 \
            --set eval.metrics='[fd_digits,class_accuracy]' --set eval.every_steps=500 --set eval.num_samples=1000 \
            > $R/d8-$o.log 2>&1 &
    done
    wait
    tail -n 3 $R/teacher32.log $R/d8-*.log
    cp $R/teacher32/final/model.safetensors "$OUT/teacher32.safetensors"
    tar czf "$OUT/stageA.tar.gz" $R/teacher32/log.jsonl $R/teacher32/final/*.json $R/d8-*/metrics.jsonl \
        $R/d8-*/stats.jsonl $R/d8-*/config.yaml $R/*.log
    ;;
B)
    join_inception "$R/inception_parts"
    onestep eval $R/ref/digits32.npz --metrics fid --save-stats $R/ref/digits32-fid.npz --batch 500 --json > $R/ref32.json
    onestep eval $R/ref/digits8.npz --metrics fid --save-stats $R/ref/digits8-fid.npz --batch 500 --json > $R/ref8.json
    for lr in 1e-4 1e-5; do for o in sim sid dmd di; do distil32 $o $lr & done; done
    # Issue 3: 1000 samples (seeds 0-999) of each 8x8 student and of the teacher (Heun, 35 NFE) vs all 1797 digits.
    onestep sample $R/d8-sim --teacher --steps 18 --num 1000 --out $R/teacher8-heun35 > /dev/null
    mkdir -p $R/eval8
    for src in teacher8-heun35 d8-sim d8-sid d8-dmd d8-di; do
        onestep eval $R/$src --num 1000 --metrics fid --ref $R/ref/digits8-fid.npz --json > $R/eval8/$src-fid.json
        onestep eval $R/$src --num 1000 --metrics fd_digits,class_accuracy --json > $R/eval8/$src-digits.json
        echo "$src $(metric < $R/eval8/$src-fid.json) $(metric < $R/eval8/$src-digits.json)"
    done
    wait
    # Issue 8: the 32x32 teacher's own FID-10k (Heun, 35 NFE), seeds 0-9999 (sampled through a run that now has a
    # checkpoint: `onestep sample --teacher` reads the teacher from the run's config).
    onestep sample $R/d32-sid-lr1e-5 --teacher --steps 18 --num 10000 --out $R/teacher32-heun35 > /dev/null
    onestep eval $R/teacher32-heun35 --metrics fid --ref $R/ref/digits32-fid.npz --batch 200 --json \
        > $R/teacher32-heun35-fid.json
    echo "teacher32 heun35 $(metric < $R/teacher32-heun35-fid.json)"
    tail -n 2 $R/d32-*.log
    tar czf "$OUT/stageB.tar.gz" $R/ref*.json $R/eval8 $R/teacher32-heun35-fid.json $R/d32-*/metrics.jsonl \
        $R/d32-*/stats.jsonl $R/d32-*/config.yaml $R/d32-*.log
    ;;
C)
    for lr in 1e-4 1e-5; do for o in sim sid dmd di; do distil32 $o $lr & done; done
    wait
    tail -n 2 $R/d32-*.log
    tar czf "$OUT/stageC.tar.gz" $R/d32-*/metrics.jsonl $R/d32-*/stats.jsonl $R/d32-*/config.yaml $R/d32-*.log
    ;;
*)
    echo "usage: $0 A|B|C" >&2; exit 2 ;;
esac
