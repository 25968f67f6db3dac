#!/usr/bin/env bash
# Issue 7's CUDA-graph measurements on one GPU of the device machine, from the repository root:
#   bash scripts/gpu_perf_session.sh A   # GPU tests of train.cuda_graph; profiles of eager and graphed steps
#   bash scripts/gpu_perf_session.sh B   # the same under torch.compile (regional), NCHW and channels_last
#   bash scripts/gpu_perf_session.sh C   # after the resampling and skip-concatenation changes: eager graph, and
#                                          compiled NCHW against channels_last (compiled side by side)
#   bash scripts/gpu_perf_session.sh E   # inductor layout optimisation off; batch 256 for SiD and DMD; sampling
#   WHEELS=.whl bash scripts/gpu_perf_session.sh F   # GPU tests of cuda_graph (augmentation); the PixArt SIM step:
#                                          gradient checkpointing of all, the teacher alone, or none; compiled
#   WHEELS=.whl bash scripts/gpu_perf_session.sh G   # PixArt compiled: fused Adam; no checkpointing at batch 12
#   WHEELS=.whl bash scripts/gpu_perf_session.sh H   # PixArt: prompts kept on the GPU; the step as a CUDA graph
#   WHEELS=.whl bash scripts/gpu_perf_session.sh I   # H's graphed rows after a fix; SiD batch 256 graphed + compiled
#   bash scripts/gpu_perf_session.sh J   # channels_last + compile with the NHWC GroupNorm, SiD batch 128 and 256
#   bash scripts/gpu_perf_session.sh J2  # J with the NHWC GroupNorm's reductions over HW first (coalesced)
#   bash scripts/gpu_perf_session.sh N   # the Triton NHWC GroupNorm+SiLU kernels: GPU tests, and alone against
#                                          ATen and inductor on DDPM++'s shapes
#   bash scripts/gpu_perf_session.sh O   # SiD batch 256 graphed + compiled: channels_last with the Triton kernels,
#                                          channels_last without them (J2), NCHW (I); compiled side by side
#   bash scripts/gpu_perf_session.sh P   # the kernels' reductions looping over blocks of tiles: alone, and in SiD
#   bash scripts/gpu_perf_session.sh Q   # SIM and DI at batch 256 with the kernels
#   bash scripts/gpu_perf_session.sh R   # the kernels' GPU tests; their launch settings (blocks, warps, pipelining,
#                                          unrolling, tile size) alone on DDPM++'s shapes
#   bash scripts/gpu_perf_session.sh S   # blocks of 131072 with fewer warps alone; SiD and DI at batch 256 with the
#                                          kernels' blocks of 131072
#   bash scripts/gpu_perf_session.sh T   # the kernels alone on DDPM++'s and ADM's norm shapes; SIM at batch 256 as
#                                          in S, alone (not run yet)
#   bash scripts/gpu_perf_session.sh U   # ADM ImageNet-64 SiD in channels_last with the kernels, graphed and
#                                          compiled, alone: paired with T its compilation outlasted a 600 s call
#   WHEELS=.whl bash scripts/gpu_perf_session.sh K   # onestep distill --preset pixart-sim as a user runs it
#   bash scripts/gpu_perf_session.sh M   # ADM ImageNet-64 SiD, graphed, eager and compiled
#   TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0 bash scripts/gpu_perf_session.sh L   # SIM and DI rows, batch 256
# Needs pydantic's wheels in .whlmin, and for F diffusers' and peft's too in .whl (see docs/benchmarks.md); writes JSON and logs under $OUT (kept in
# docs/logs/cuda_graph/ with the stage letter prefixed). In E the three compiled rows share the 80 GB of an H100
# while they wait their turn: the batch-256 SiD row's capture ran out of memory there and it ran eagerly (compiled);
# time it alone.
set -u
stage=${1:?stage A, B, C or E}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whlmin}/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader

profile() {  # profile NAME ARGS...: one row of scripts/profile_step.py, its JSON in $OUT/NAME.json
  local name=$1; shift
  timeout 300 python3 scripts/profile_step.py "$@" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | grep -v "^    "
}

compile_triple() {  # compile_triple NAME "ARGS" x3: compile all at once, then time one at a time
  local names=() pids=() i
  rm -f /tmp/ready_* /tmp/go_*
  for i in 0 1 2; do
    local name=$1 args=$2; shift 2
    env $(echo "$args" | grep -o "ENV=[^ ]*" | sed 's/^ENV=//') timeout 580 python3 scripts/profile_step.py \
      $(echo "$args" | sed 's/ENV=[^ ]*//g') --ready /tmp/ready_$i --go /tmp/go_$i --out "$OUT/$name.json" \
      > "$OUT/$name.log" 2>&1 &
    names+=("$name"); pids+=($!)
  done
  for i in 0 1 2; do
    while [ ! -e /tmp/ready_$i ] && kill -0 ${pids[$i]} 2>/dev/null; do sleep 1; done
  done
  for i in 0 1 2; do touch /tmp/go_$i; wait ${pids[$i]}; done
  for i in 0 1 2; do grep -v "^    \|Warning\|_warn_once" "$OUT/${names[$i]}.log"; done
}

compile_pair() {  # compile_pair NAME_A "ARGS_A" NAME_B "ARGS_B": compile both at once, then time one at a time
  local a=$1 args_a=$2 b=$3 args_b=$4
  rm -f /tmp/ready_a /tmp/ready_b /tmp/go_a /tmp/go_b
  timeout 580 python3 scripts/profile_step.py $args_a --ready /tmp/ready_a --go /tmp/go_a --out "$OUT/$a.json" \
    > "$OUT/$a.log" 2>&1 &
  local pa=$!
  timeout 580 python3 scripts/profile_step.py $args_b --ready /tmp/ready_b --go /tmp/go_b --out "$OUT/$b.json" \
    > "$OUT/$b.log" 2>&1 &
  local pb=$!
  while { [ ! -e /tmp/ready_a ] && kill -0 $pa 2>/dev/null; } || { [ ! -e /tmp/ready_b ] && kill -0 $pb 2>/dev/null; }
  do sleep 1; done
  touch /tmp/go_a; wait $pa; touch /tmp/go_b; wait $pb
  grep -v "^    \|Warning\|_warn_once" "$OUT/$a.log" "$OUT/$b.log"
}

pixart() {  # pixart NAME BATCH ARGS...: one PixArt SIM step timing (scripts/pixart_step.py), its JSON in $OUT/NAME.json
  local name=$1 batch=$2; shift 2
  echo "== $name"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 240 python3 scripts/pixart_step.py --out /tmp/pixart \
    --text-encoder-layers 2 --batch "$batch" --steps 5 --profile --json-out "$OUT/$name.json" "$@" 2>&1 \
    | grep -v "Warning\|warn\|it/s\]\|^ *$" | tail -30
}

case $stage in
  A)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -15 | tee "$OUT/tests.log"
    profile sid_b128_eager --row sid-cifar10 --batch 128
    profile sid_b128_graph --row sid-cifar10 --batch 128 --cuda-graph
    profile sid_b64_graph --row sid-cifar10 --batch 64 --cuda-graph
    profile sid_b256_graph --row sid-cifar10 --batch 256 --cuda-graph
    profile dmd_b128_graph --row dmd-cifar10 --batch 128 --cuda-graph
    profile dmd_b256_graph --row dmd-cifar10 --batch 256 --cuda-graph
    ;;
  B)
    profile sid_b128_graph_compile --row sid-cifar10 --batch 128 --cuda-graph --compile
    profile sid_b256_graph_compile_cl --row sid-cifar10 --batch 256 --cuda-graph --compile --channels-last
    ;;
  C)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_edm_networks.py 2>&1 | tail -3
    profile sid_b128_graph_v2 --row sid-cifar10 --batch 128 --cuda-graph
    compile_pair sid_b128_graph_compile_v2 "--row sid-cifar10 --batch 128 --cuda-graph --compile" \
      sid_b128_graph_compile_cl_v2 "--row sid-cifar10 --batch 128 --cuda-graph --compile --channels-last"
    ;;
  E)  # a user's run with and without train.cuda_graph; inductor's layout optimisation off (NCHW) against on, and
      # the batch of 256, side by side; then compiled sampling
    for graph in false true; do
      timeout 150 python3 -m onestep_cli distill --preset digits32-sid --set train.cuda_graph=$graph \
        --set train.max_steps=60 --set train.tick_every=20 --set eval.metrics=[] --out /tmp/run_$graph > /dev/null 2>&1
      echo "cuda_graph=$graph: rc $? $(tail -1 /tmp/run_$graph/stats.jsonl)"
    done
    compile_triple sid_b128_nolayoutopt "--row sid-cifar10 --batch 128 --cuda-graph --compile ENV=TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0" \
      sid_b256 "--row sid-cifar10 --batch 256 --cuda-graph --compile" \
      dmd_b256 "--row dmd-cifar10 --batch 256 --cuda-graph --compile"
    python3 -m onestep_cli bench --rows sample-cifar10 --compile --channels-last --json > "$OUT/sample_compile_cl.json"
    python3 -c "import json; r = json.load(open('$OUT/sample_compile_cl.json'))[0]; print({k: r.get(k) for k in ('row', 'batch', 'images_per_s', 'first_iter_s', 'peak_memory_gb', 'flop_utilisation')})"
    ;;
  F)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -4 | tee "$OUT/tests.log"
    pixart pixart_b16_ckpt_all 16
    pixart pixart_b16_ckpt_teacher 16 --set "train.gradient_checkpointing=[teacher]"
    pixart pixart_b8_ckpt_none 8 --set train.gradient_checkpointing=false
    pixart pixart_b16_ckpt_teacher_compile 16 --set "train.gradient_checkpointing=[teacher]" --set train.compile=true
    ;;
  G)  # PixArt, compiled: the fused optimizer; no checkpointing at a smaller batch
    fused=(--set train.compile=true --set train.fused_optimizer=true)
    pixart pixart_b16_ckpt_teacher_compile_fused 16 --set "train.gradient_checkpointing=[teacher]" "${fused[@]}"
    # (A third row here asked SDPA to leave cuDNN with a flag since removed: the compiled step kept cuDNN's kernels.)
    pixart pixart_b12_ckpt_none_compile_fused 12 --set train.gradient_checkpointing=false "${fused[@]}"
    ;;
  H)  # PixArt with its prompts on the GPU (no host sync per draw), then the whole step as a CUDA graph
    python3 -m pytest -q -p no:cacheprovider tests/test_text_to_image.py -k "captured or deferred" 2>&1 | tail -3
    fused=(--set train.compile=true --set train.fused_optimizer=true)
    pixart pixart_b12_ckpt_none_compile_fused_v2 12 --set train.gradient_checkpointing=false "${fused[@]}"
    pixart pixart_b12_ckpt_none_compile_fused_graph 12 --set train.gradient_checkpointing=false "${fused[@]}" \
      --set train.cuda_graph=true --steps 8
    pixart pixart_b16_ckpt_teacher_compile_fused_graph 16 --set "train.gradient_checkpointing=[teacher]" \
      "${fused[@]}" --set train.cuda_graph=true --steps 8
    ;;
  I)  # H's graphed rows again after the fix of the prompts' device check; then SiD at batch 256, alone on the GPU
    python3 -m pytest -q -p no:cacheprovider tests/test_text_to_image.py -k "captured or deferred" 2>&1 | tail -3
    fused=(--set train.compile=true --set train.fused_optimizer=true)
    pixart pixart_b12_ckpt_none_compile_fused_graph 12 --set train.gradient_checkpointing=false "${fused[@]}" \
      --set train.cuda_graph=true --steps 8
    pixart pixart_b16_ckpt_teacher_compile_fused_graph 16 --set "train.gradient_checkpointing=[teacher]" \
      "${fused[@]}" --set train.cuda_graph=true --steps 8
    TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0 profile sid_b256_graph_compile_nolayoutopt --row sid-cifar10 --batch 256 \
      --cuda-graph --compile
    ;;
  K)  # As a user runs it: onestep distill --preset pixart-sim on the random-init pipeline, the preset's settings and
      # the fastest measured ones; the last stats.jsonl row (steps 21-30) of each
    python3 scripts/pixart_step.py --out /tmp/pixart --text-encoder-layers 2 --batch 2 --steps 2 > /dev/null 2>&1
    printf 'a photo of a cat\na red bicycle in the rain\nan astronaut riding a horse\na bowl of fruit\n' > /tmp/prompts.txt
    common=(--preset pixart-sim --set teacher.path=/tmp/pixart/pipeline-t5x2 --set prompts.path=/tmp/prompts.txt
            --set train.max_steps=30 --set train.tick_every=10 --set train.checkpoint_every=1000)
    for run in "preset 16" "fast 12 --set train.gradient_checkpointing=false --set train.compile=true"; do
      set -- $run
      name=$1 batch=$2; shift 2
      timeout 280 python3 -m onestep_cli distill "${common[@]}" --set train.batch_size=$batch "$@" --out /tmp/run_$name \
        > "$OUT/distill_$name.txt" 2>&1
      echo "$name: rc $? $(tail -1 /tmp/run_$name/stats.jsonl)"
      grep -i "graph\|compile\|warn" "$OUT/distill_$name.txt" | head -5
      rm -rf /tmp/run_$name  # Its checkpoint and export: about 25 GB of the machine's 64.
    done
    ;;
  L)  # SIM and DI at batch 256, graphed and compiled (NCHW, inductor's layout optimisation off), compiled side by side
    compile_pair sim_b256_graph_compile_nolayoutopt \
      "--row sim-cifar10 --batch 256 --cuda-graph --compile" \
      di_b256_graph_compile_nolayoutopt "--row di-cifar10 --batch 256 --cuda-graph --compile"
    ;;
  J2)  # J again after the NHWC GroupNorm became per-channel reductions over HW, then over each group's channels
    compile_pair sid_b128_graph_compile_cl_nhwcnorm2 "--row sid-cifar10 --batch 128 --cuda-graph --compile --channels-last" \
      sid_b256_graph_compile_cl_nhwcnorm2 "--row sid-cifar10 --batch 256 --cuda-graph --compile --channels-last"
    ;;
  M)  # ADM ImageNet-64 SiD: the graphed step, eager and compiled (NCHW, layout optimisation off)
    profile sid_imagenet64_b32_graph --row sid-imagenet64 --batch 32 --cuda-graph
    TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0 timeout 400 python3 scripts/profile_step.py --row sid-imagenet64 --batch 32 \
      --cuda-graph --compile --out "$OUT/sid_imagenet64_b32_graph_compile.json" 2>&1 \
      | tee "$OUT/sid_imagenet64_b32_graph_compile.log" | grep -v "^    "
    ;;
  J)  # channels_last under compile with GroupNorm computed on the NHWC view (no NCHW copies), batch 128 and 256
    compile_pair sid_b128_graph_compile_cl_nhwcnorm "--row sid-cifar10 --batch 128 --cuda-graph --compile --channels-last" \
      sid_b256_graph_compile_cl_nhwcnorm "--row sid-cifar10 --batch 256 --cuda-graph --compile --channels-last"
    ;;
  N)  # the Triton NHWC GroupNorm+SiLU kernels: compiled against float64 ATen, in the network, and their speed alone
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_group_norm_nhwc.py 2>&1 | tail -5
    timeout 200 python3 scripts/group_norm_nhwc_bench.py --network hand-picked 2>&1 \
      | grep -v "Warning\|warn" | tee "$OUT/group_norm_nhwc_bench.txt"
    ;;
  O)  # SiD batch 256, graphed and compiled: NHWC with our kernels, NHWC with inductor's GroupNorm (J2), NCHW (I)
    compile_triple sid_b256_graph_compile_cl_triton "--row sid-cifar10 --batch 256 --cuda-graph --compile --channels-last" \
      sid_b256_graph_compile_cl_inductor "--row sid-cifar10 --batch 256 --cuda-graph --compile --channels-last --no-nhwc-kernels" \
      sid_b256_graph_compile_nchw "ENV=TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0 --row sid-cifar10 --batch 256 --cuda-graph --compile"
    ;;
  P)  # after the reduction kernels became loops over blocks of tiles: the kernels alone, then SiD batch 256 with them
    timeout 150 python3 scripts/group_norm_nhwc_bench.py --network hand-picked --block-elements 16384,32768,65536 2>&1 \
      | grep -v "Warning\|warn" | tee "$OUT/group_norm_nhwc_bench_blocks.txt"
    timeout 420 python3 scripts/profile_step.py --row sid-cifar10 --batch 256 --cuda-graph --compile --channels-last \
      --out "$OUT/sid_b256_graph_compile_cl_triton2.json" 2>&1 | tee "$OUT/sid_b256_graph_compile_cl_triton2.log" \
      | grep -v "^    "
    ;;
  Q)  # SIM and DI at batch 256 with the kernels (graphed, compiled, channels_last), compiled side by side
    compile_pair sim_b256_graph_compile_cl_triton "--row sim-cifar10 --batch 256 --cuda-graph --compile --channels-last" \
      di_b256_graph_compile_cl_triton "--row di-cifar10 --batch 256 --cuda-graph --compile --channels-last"
    ;;
  R)  # the kernels' GPU tests, then their launch settings against each other on DDPM++'s shapes
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_group_norm_nhwc.py 2>&1 | tail -5
    timeout 420 python3 scripts/group_norm_nhwc_bench.py --network hand-picked --block-elements 65536 \
      --variant stages=1 \
      --variant unroll=2 --variant unroll=4 --variant blocks=131072 --variant blocks=262144 --variant warps=16 \
      --variant warps=4 --variant tile=8192 --variant tile=8192,warps=16 --variant blocks=131072,unroll=2 2>&1 \
      | grep -v "Warning\|warn" | tee "$OUT/group_norm_nhwc_bench_variants.txt"
    ;;
  S)  # after blocks of 131072 became the default: with 4 warps alone, then SiD and DI compiled side by side
    timeout 150 python3 scripts/group_norm_nhwc_bench.py --network hand-picked --block-elements 65536,131072 \
      --variant warps=4 2>&1 \
      | grep -v "Warning\|warn" | tee "$OUT/group_norm_nhwc_bench_warps.txt"
    compile_pair sid_b256_graph_compile_cl_triton3 "--row sid-cifar10 --batch 256 --cuda-graph --compile --channels-last" \
      di_b256_graph_compile_cl_triton3 "--row di-cifar10 --batch 256 --cuda-graph --compile --channels-last"
    ;;
  T)  # the kernels alone on every norm shape of DDPM++ and of ADM (S's tables used a hand-picked list); SIM as in S
    for network in ddpmpp-cifar10 adm-imagenet64; do
      timeout 100 python3 scripts/group_norm_nhwc_bench.py --network $network 2>&1 | grep -v "Warning\|warn" \
        | tee "$OUT/group_norm_nhwc_bench_$network.txt"
    done
    timeout 580 python3 scripts/profile_step.py --row sim-cifar10 --batch 256 --cuda-graph --compile --channels-last \
      --out "$OUT/sim_b256_graph_compile_cl_triton3.json" 2>&1 | tee "$OUT/sim_b256_graph_compile_cl_triton3.log" \
      | grep -v "^    "
    ;;
  U)  # ADM ImageNet-64 SiD in channels_last with the kernels (M's rows were NCHW); its compilation takes minutes
    timeout 590 python3 scripts/profile_step.py --row sid-imagenet64 --batch 32 --cuda-graph --compile --channels-last \
      --out "$OUT/sid_imagenet64_b32_graph_compile_cl_triton.json" 2>&1 \
      | tee "$OUT/sid_imagenet64_b32_graph_compile_cl_triton.log" | grep -v "^    "
    ;;
esac
