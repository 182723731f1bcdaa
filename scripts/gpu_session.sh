#!/usr/bin/env bash
# Steps run on the lent GPU machine (see ../shared/device/README.md); each is one `run` call.
#   install  : join the MLX CUDA wheel (carried in three parts: .mlx-cuda-3/{a,b,c}; a and b copied
#              to /tmp by the two calls before) and install it into /tmp/mlxsite
#   synth    : write the 2.9B-shaped synthetic models into /tmp/synth in the background
#   tests    : the GPU tests against the carried oracle part ($ORACLE_PART, default .oracle-1)
#   probe    : decode probe on each synthetic model that is ready
#   costs    : host and device time per launch, prefill routes (development aids)
#   llamacpp : build llama.cpp's llama-bench (CUDA, sm_90) from the carried .llama-cpp/ (scripts/prepare_llama_cpp.sh,
#              about 2.5 MB) into /tmp/llama.cpp, about 3 minutes; later calls reuse it while the machine stays warm
#   bench    : the benchmark log entries, ours and the peers' (needs $TITLE and $CHANGE): PEERS="mlx-lm llama.cpp"
#              (default; PEERS=0: ours only); with llama.cpp among them ours runs at every prompt length of
#              bench.benchmark.PREFILL_LENGTHS, and llama-bench (built by the llamacpp step) on the same files;
#              PROCESSES=N runs ours N times, each in a process of its own, and the peers take their median
#   scaling  : batched decode (scripts/batch_decode.py) per route, lines in $OUT/scaling.jsonl
#   mma      : batched decode on the matrix units (matvec.kern MMA, the kernels route) beside MLX's products, per model,
#              each RWKV_MLX_MMA_K_PARTS setting ($PARTS, default "4 1") in a process of its own; BATCHES, TOKENS
#   serve    : scripts/bench_serve.py per model, with the routes scaling's lines favour for it
#   grammar  : the per-token cost of constrained decoding (scripts/grammar_cost.py) on the first model
#   forms    : decode and prefill probes of GGUF blocks as stored against MLX's affine form, alternating
#   prefill  : prompt tok/s at 512 and 4,096 tokens, weights expanded to float32 and to float16
#   fidelity : prompt logits of the carried oracle part against exact math, per expansion dtype
#   profile  : GPU time per kernel (CUPTI) of decode and of a 512-token prompt, for each weight form
#   spread   : one-row decode in $PROCESSES processes (default 4), each timed unprofiled ($REPEAT runs, then the host alone) and then
#              profiled with CUPTI, with the GPU's clocks before each: why one tree's decode differs between processes
#   ncu      : Nsight Compute's sections (speed of light, warp stalls, memory, occupancy) of chosen decode launches
#   compare  : decode probes of this tree and of .baseline/ (an older commit's package, carried), alternating;
#              make it here with: mkdir .baseline && git archive REV rwkv_mlx custom_kernels scripts | tar -x -C .baseline
#              && rm .baseline/rwkv_mlx/data/*.gguf && echo REV > .baseline/COMMIT  (and /.baseline/ in .git/info/exclude);
#              ROUNDS=1: one round only; PREFILL="512 4096" also times both trees' prompts (weights expanded to float16) in round 1
#   ab       : one tree, settings side by side in separate processes (AB="VAR=a VAR=b", ROUNDS, BATCHES)
#   pace     : scripts/decode_pace.py in a process per setting (PACE="X=1 VAR=b", SEQ batch sizes, PIN, PACE_ARGS), the GPU's
#              clocks sampled meanwhile into $OUT/pace-clocks.csv: what sets each batch size's pace
set -uo pipefail
ab_tree() {  # the tree an `ab` setting runs from: this one, TREE=DIR's (.baseline), or a copy with its KERN_NAME=V defines applied
  local defs=() a; for a in ${1//,/ }; do [[ $a == KERN_* ]] && defs+=("${a#KERN_}"); [[ $a == TREE=* ]] && { echo "$PWD/${a#TREE=}"; return; }; done
  [ ${#defs[@]} = 0 ] && { echo "$PWD"; return; }
  for a in "${defs[@]}"; do
    grep -q "^#define ${a%%=*} " custom_kernels/*.kern || { echo "ab: no #define ${a%%=*} in custom_kernels/" >&2; return 2; }
  done
  local dir=/tmp/ab/${1//[^A-Za-z0-9_=]/_}
  [ -d $dir ] || { mkdir -p $dir && cp -r rwkv_mlx custom_kernels scripts $dir/
    for a in "${defs[@]}"; do sed -i "s/^#define ${a%%=*} .*/#define ${a%%=*} ${a#*=}/" $dir/custom_kernels/*.kern; done; }
  echo $dir
}
export PYTHONPATH=/tmp/mlxsite:$PWD PYTHONUNBUFFERED=1 MLX_ENABLE_TF32=0
OUT=${OUT:-/tmp/out}
step=$1; shift
case $step in
  install)  # (a call without .mlx-cuda-3/c carried once sat out its whole limit in `wait`: say so and stop)
    [ -f .mlx-cuda-3/c/install.sh ] || { echo "install: .mlx-cuda-3/c is not here: carry it in this call"; exit 2; }
    bash .mlx-cuda-3/c/install.sh && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv ;;
  synth)
    python3 -c "import mlx.core" 2>/dev/null || { echo "synth: MLX does not import: run install first"; exit 2; }
    mkdir -p /tmp/synth
    for t in "$@"; do
      [ -f /tmp/synth/$t.gguf ] || setsid nohup python3 scripts/make_synthetic_model.py --out /tmp/synth/$t.gguf --type $t --quiet \
        > /tmp/synth/$t.log 2>&1 < /dev/null &
    done
    sleep 2; ls -la /tmp/synth ;;
  tests)
    part=${ORACLE_PART:-.oracle-1}
    RWKV_MLX_ORACLE=$PWD/$part timeout -s KILL ${TEST_LIMIT:-500} python3 -m pytest -q -p no:cacheprovider "$@" \
      > $OUT/tests$part.log 2>&1
    tail -40 $OUT/tests$part.log ;;
  wait)  # the writer renames its temporary file at the end: the name appears when the model is whole.
    # (pgrep -f on the path matched the calling shell whenever the call's command line named the file.)
    for t in "$@"; do
      [ -f /tmp/synth/$t.log ] || { echo "wait: no writer was started for $t (synth $t first)" >&2; exit 2; }
      for _ in $(seq 200); do
        [ -f /tmp/synth/$t.gguf ] && break
        grep -qiE "traceback|error" /tmp/synth/$t.log && { tail -3 /tmp/synth/$t.log >&2; exit 2; }  # (the writer failed)
        sleep 3
      done
      tail -2 /tmp/synth/$t.log
    done ;;
  probe)
    for f in "$@"; do python3 scripts/decode_probe.py --launches "$f" 2>&1 | tee -a $OUT/probe.log; done ;;
  train)  # the demo model's recipe (scripts/train_demo_model.py); .gpu-train carries Tiny Shakespeare.
    # Our one GPU attempt spent 232 s compiling before its first step: the shipped model was trained on the CPU.
    mkdir -p $OUT/demo
    python3 scripts/train_demo_model.py --data .gpu-train/tinyshakespeare.txt --run /tmp/demo-run --out $OUT/demo \
      2>&1 | tee $OUT/train.log | grep -v '^step [0-9]*/' ;;
  llamacpp)
    bash scripts/build_llama_bench.sh /tmp/llama.cpp 2>&1 | tee -a $OUT/llamacpp.log | tail -8 ;;
  bench)  # the benchmark log entries for the 2.9B-shaped models ($TYPES), ours and the peers' ($PEERS)
    types=${TYPES:-Q4_K_M Q8_0 F16}  # a type named twice is benchmarked twice, in a fresh process
    peers=${PEERS:-mlx-lm llama.cpp}; [ "$peers" = 0 ] && peers=""
    llama_bench=${LLAMA_BENCH:-/tmp/llama.cpp/build/bin/llama-bench}
    case " $peers " in *" llama.cpp "*)
      [ -x "$llama_bench" ] || { echo "no $llama_bench: run the llamacpp step first (or PEERS=mlx-lm)"; exit 2; }
      lengths=$(python3 -c "from rwkv_mlx.bench.benchmark import PREFILL_LENGTHS as p; print(*p)") || exit 1 ;;
    esac
    bash "$0" wait $types
    mkdir -p $OUT/results
    # -n: a second bench call on the same machine appends to the first's entries instead of starting them over
    # (step 22 lost two types' entries to this copy)
    cp -n results/BENCHMARKS.md results/benchmarks.jsonl results/peers.md $OUT/results/ 2>/dev/null
    for t in $types; do
      for p in ${lengths:-default}; do
        for _ in $(seq ${PROCESSES:-1}); do  # PROCESSES > 1: bench_peers compares the median of those processes
        for expand in "" float32; do  # float32: only when the default's entry was refused by the quality gate (exit 5)
          RWKV_MLX_CUDA_EXPAND_DTYPE=$expand python3 -c "from rwkv_mlx.cli import main; main()" benchmark \
            --model /tmp/synth/$t.gguf --title "$TITLE" --device gpu --results-dir $OUT/results --quiet \
            --change "$CHANGE ($t$([ $p = default ] || echo ", $p-token prompt")${expand:+, RWKV_MLX_CUDA_EXPAND_DTYPE=$expand})" \
            $([ $p = default ] || echo --prompt-tokens $p) 2>&1 | tail -30
          [ "${PIPESTATUS[0]}" = 5 ] || break
        done
        done
      done
    done
    for pair in 4bit:Q4_K_M 8bit:Q8_0 float16:F16; do
      case " $types " in *" ${pair#*:} "*) ;; *) continue ;; esac
      for peer in $peers; do
        python3 scripts/bench_peers.py --peer $peer --llama-bench "$llama_bench" --model /tmp/synth/${pair#*:}.gguf \
          --mode ${pair%%:*} --ours log --results-dir $OUT/results --title "$TITLE" \
          $([ $peer = llama.cpp ] && echo --prompt-tokens $lengths) 2>&1 | tail -20
      done
    done ;;
  costs)  # host and device time per launch (scripts/launch_cost.py), prefill routes and the WKV share
    bash "$0" wait "$@" || exit 2
    python3 scripts/launch_cost.py 2>&1 | tee -a $OUT/costs.log
    python3 scripts/kernel_profile.py /tmp/synth/$1.gguf 2>&1 | grep -v Warning | tee -a $OUT/costs.log
    for t in "$@"; do
      python3 scripts/decode_probe.py /tmp/synth/$t.gguf --no-reference --tokens 32 --prefill 512 2>&1 | tee -a $OUT/costs.log
    done ;;
  explore)  # decode probe per MLX_MAX_OPS_PER_BUFFER (kernels per CUDA graph), prefill routes, WKV share
    bash "$0" wait "$@" || exit 2
    for t in "$@"; do
      python3 scripts/decode_probe.py /tmp/synth/$t.gguf --no-reference --launches --stream --prefill 512 2>&1 \
        | tee -a $OUT/explore.log
    done
    for ops in 60 120 240; do
      echo "== MLX_MAX_OPS_PER_BUFFER=$ops" | tee -a $OUT/explore.log
      MLX_MAX_OPS_PER_BUFFER=$ops python3 scripts/decode_probe.py /tmp/synth/$1.gguf --no-reference --stream 2>&1 \
        | tee -a $OUT/explore.log
    done
    echo "== MLX_USE_CUDA_GRAPHS=0" | tee -a $OUT/explore.log
    MLX_USE_CUDA_GRAPHS=0 python3 scripts/decode_probe.py /tmp/synth/$1.gguf --no-reference --stream 2>&1 \
      | tee -a $OUT/explore.log ;;
  scaling)
    bash "$0" wait "$@" || exit 2
    for t in "$@"; do
      routes="matmul matmul-q kernels"; [ "$t" = F16 ] && routes="matmul kernels"  # (dense: no quantized product)
      timeout -s KILL ${SCALING_LIMIT:-240} python3 scripts/batch_decode.py /tmp/synth/$t.gguf --batches ${BATCHES:-1 4 16 32 64} \
        --routes $routes --json $OUT/scaling.jsonl 2>&1 | grep -v Warning | tee -a $OUT/scaling.log
    done ;;
  mma)
    bash "$0" wait "$@" >/dev/null || exit 2
    for t in "$@"; do
      for parts in ${PARTS:-4 1}; do
        echo "== $t kernels (MMA from ${RWKV_MLX_MMA_MIN_ROWS:-8} rows), RWKV_MLX_MMA_K_PARTS=$parts" | tee -a $OUT/mma.log
        RWKV_MLX_MMA_K_PARTS=$parts timeout -s KILL ${SCALING_LIMIT:-200} python3 scripts/batch_decode.py /tmp/synth/$t.gguf \
          --batches ${BATCHES:-1 8 16 32 64} --routes kernels --tokens ${TOKENS:-32} --json $OUT/mma.jsonl 2>&1 \
          | grep -v Warning | tee -a $OUT/mma.log
      done
      [ "${PRODUCTS:-1}" = 0 ] && continue
      echo "== $t MLX products (the CUDA default above RWKV_MLX_KERNEL_MAX_BATCH rows)" | tee -a $OUT/mma.log
      timeout -s KILL ${SCALING_LIMIT:-200} python3 scripts/batch_decode.py /tmp/synth/$t.gguf --batches ${PRODUCT_BATCHES:-16 32 64} --routes matmul \
        --tokens ${TOKENS:-32} --json $OUT/mma.jsonl 2>&1 | grep -v Warning | tee -a $OUT/mma.log
    done ;;
  serve)
    bash "$0" wait "$@" || exit 2
    mkdir -p $OUT/results
    for t in "$@"; do
      settings=$(python3 scripts/batch_decode.py /tmp/synth/$t.gguf --suggest $OUT/scaling.jsonl 2>/dev/null)
      echo "== $t: $settings" | tee -a $OUT/serve.log
      env $settings timeout -s KILL ${SERVE_LIMIT:-240} python3 scripts/bench_serve.py --model /tmp/synth/$t.gguf \
        --clients ${CLIENTS:-1,4,16,64} --prompt-tokens 64 --gen-tokens 64 --greedy --device gpu \
        --results-dir $OUT/results --note "$t; $settings" 2>&1 | grep -v Warning | tee -a $OUT/serve.log
    done ;;
  grammar)
    bash "$0" wait "$1"
    timeout -s KILL ${GRAMMAR_LIMIT:-200} python3 scripts/grammar_cost.py /tmp/synth/$1.gguf 2>&1 | grep -v Warning \
      | tee -a $OUT/grammar.log ;;
  forms)  # GGUF blocks as stored vs MLX's affine form (RWKV_MLX_GPU_BLOCKS), alternating, one tree: decode and prefill
    bash "$0" wait "$@" || exit 2
    for t in "$@"; do
      for round in 1 2; do
        for form in affine stored; do
          echo "== $t round $round form $form" | tee -a $OUT/forms.log
          RWKV_MLX_GPU_BLOCKS=$form timeout -s KILL 150 python3 scripts/decode_probe.py /tmp/synth/$t.gguf --tokens 128 \
            --prefill 512 $([ $round = 1 ] && [ $form = stored ] || echo --no-reference) 2>&1 | grep -v Warning \
            | tee -a $OUT/forms.log
        done
      done
    done ;;
  prefill)  # prompt tok/s at 512 and 4,096 tokens ($LENGTHS), weights expanded to float32 and to float16 ($EXPAND;
    # RWKV_MLX_CUDA_EXPAND_DTYPE), per prompt chunk length ($CHUNKS: CUDA expands each quantized matrix once a chunk)
    bash "$0" wait "$@" || exit 2
    for t in "$@"; do
      echo "== $t prefill, form ${RWKV_MLX_GPU_BLOCKS:-default}" | tee -a $OUT/prefill.log
      timeout -s KILL ${PREFILL_LIMIT:-150} python3 scripts/decode_probe.py /tmp/synth/$t.gguf --tokens 16 --no-reference \
        --prefill ${LENGTHS:-512 4096} --expand ${EXPAND:-float32 float16} --chunks ${CHUNKS:-512} --no-quantized-products 2>&1 \
        | grep -v Warning \
        | tee -a $OUT/prefill.log
    done ;;
  fidelity)  # prompt logits against the oracle's exact logits, weights expanded to float32 and to float16
    python3 scripts/prefill_fidelity.py ${ORACLE_PART:-.oracle-1} 2>&1 | grep -v Warning | tee -a $OUT/fidelity.log ;;
  profile)  # GPU time per kernel (CUPTI, scripts/kernel_profile.py): decode and a 512-token prompt, each form
    bash "$0" wait "$1"
    for form in ${FORMS:-affine stored}; do
      echo "== $1 profile, form $form" | tee -a $OUT/profile.log
      RWKV_MLX_GPU_BLOCKS=$form timeout -s KILL ${PROFILE_LIMIT:-120} python3 scripts/kernel_profile.py /tmp/synth/$1.gguf \
        --tokens 32 2>&1 | grep -v Warning | tee -a $OUT/profile.log
    done ;;
  spread)  # is a slow process's host or its GPU work slower? (kernel_log step 23: 194-279 against 301-312 tok/s)
    bash "$0" wait "$1"
    for i in $(seq ${PROCESSES:-4}); do
      echo "== $1 process $i form ${RWKV_MLX_GPU_BLOCKS:-default}: $(nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv,noheader)" | tee -a $OUT/spread.log
      timeout -s KILL ${SPREAD_LIMIT:-90} python3 scripts/kernel_profile.py /tmp/synth/$1.gguf --tokens ${TOKENS:-128} \
        --repeat ${REPEAT:-3} --no-prefill 2>&1 | grep -E "^(timed|## |\| [^k-])" | head -12 | tee -a $OUT/spread.log
    done ;;
  ncu)  # hardware counters (Nsight Compute; Firecracker machines) of the decode launches named by $KERNELS
    # (a regex of MLX's kernel names; default: the FFN-key matvec of a Q4_K_M file and the time mix).
    # BATCH=16: of batched decode instead (scripts/batch_decode.py, kernels route), e.g. the FFN key on the
    # matrix units: KERNELS="mma_read_q4_k_16_0_4_0_1_" SKIP=40 COUNT=1 (a name ends with the formats it reads,
    # READ_ variants, before the template constants). SECTIONS: ncu's sections, if not the five below.
    bash "$0" wait "$1"
    if [ -n "${BATCH:-}" ]; then
      run=(python3 scripts/batch_decode.py /tmp/synth/$1.gguf --batches "$BATCH" --routes kernels --tokens 4)
    else
      run=(python3 scripts/decode_probe.py /tmp/synth/$1.gguf --tokens 8 --no-reference)
    fi
    ${NCU:-ncu} --clock-control none --target-processes all -k "regex:${KERNELS:-matvec_one_segment.*_(affine|q4_k)_1_4_1_1|wkv7_40_64_1_}" \
      --launch-skip ${SKIP:-300} --launch-count ${COUNT:-2} \
      $(for s in ${SECTIONS:-SpeedOfLight WarpStateStats MemoryWorkloadAnalysis LaunchStats Occupancy}; do echo --section $s; done) \
      "${run[@]}" 2>&1 | grep -v Warning | tee -a $OUT/ncu.log ;;
  compare)  # side by side on one machine: .baseline (git archive of an older commit) vs this tree
    # (carry .baseline in the call that runs this step: carried in an earlier call, it was gone by this one)
    [ -f .baseline/scripts/decode_probe.py ] || { echo "compare: no .baseline/ here: carry it in this call"; exit 2; }
    bash "$0" wait "$@" || exit 2
    for t in "$@"; do
      for round in ${ROUNDS:-1 2}; do
        for tree in .baseline .; do
          echo "== $t round $round tree $tree ($(cat $tree/COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null))" | tee -a $OUT/compare.log
          PYTHONPATH=/tmp/mlxsite:$PWD/$tree timeout -s KILL 120 python3 $tree/scripts/decode_probe.py /tmp/synth/$t.gguf \
            --tokens 128 $([ $round = 1 ] && [ $tree = . ] || echo --no-reference) $([ $round = 2 ] && echo --launches) \
            $([ -n "${PREFILL:-}" ] && [ $round = 1 ] && echo --prefill $PREFILL --expand float16 --no-quantized-products) \
            2>&1 | grep -v Warning | tee -a $OUT/compare.log
        done
      done
      [ -n "${BATCHES:-}" ] || continue  # BATCHES="4 16": also the batched decode kernels of both trees
      for tree in .baseline .; do
        echo "== $t batched, tree $tree" | tee -a $OUT/compare.log
        PYTHONPATH=/tmp/mlxsite:$PWD/$tree RWKV_MLX_KERNEL_MAX_BATCH=0 timeout -s KILL 150 python3 $tree/scripts/batch_decode.py \
          /tmp/synth/$t.gguf --batches $BATCHES --tokens 32 2>&1 | grep -v Warning | tee -a $OUT/compare.log
      done
    done ;;
  ab)  # one tree, settings A/B in separate processes (an in-process alternation may bias: kernel_log step 13):
    # AB="VAR=a VAR=b,OTHER=c" (each word one process's environment, its assignments joined by commas),
    # ROUNDS (default 2), TOKENS (one-row decode, default 128), BATCHES (batched decode, default none; BATCH_TOKENS
    # a run, default 128: runs of 64 put Q4_K_M at 29x, runs of 128 at 21.5x, results/kernel_log.md step 27) by
    # ROUTES (scripts/batch_decode.py's, default kernels; its lines also go to $OUT/ab.jsonl, with the process's
    # one-stream tok/s), PROBE=0 (no one-row decode_probe: batch_decode's one-stream run is the reference),
    # STREAM=1 (decode_probe also times stream_generate, what the benchmark times: e.g. RWKV_MLX_DECODE_AHEAD),
    # PIN (taskset cores for the timed processes, e.g. while a build runs on the others). An assignment
    # KERN_NAME=V (e.g. KERN_MMA_ROW_LOADS=8) sets a kernel source's `#define NAME ...` line to V in a copy of
    # the tree (/tmp/ab/...), and that setting runs from the copy; TREE=.baseline runs that setting from the
    # carried older tree (see compare).
    [ -n "${AB:-}" ] || { echo "ab: set AB, e.g. AB=\"RWKV_MLX_SEPARATE_PROLOGUE=0 RWKV_MLX_SEPARATE_PROLOGUE=1\""; exit 2; }
    bash "$0" wait "$@" || exit 2
    pin=(); [ -n "${PIN:-}" ] && pin=(taskset -c "$PIN")
    for t in "$@"; do
      for round in $(seq ${ROUNDS:-2}); do
        for setting in $AB; do
          echo "== $t round $round $setting" | tee -a $OUT/ab.log
          tree=$(ab_tree "$setting") || exit 2
          [ "${PROBE:-1}" = 0 ] || env ${setting//,/ } PYTHONPATH=/tmp/mlxsite:$tree "${pin[@]}" timeout -s KILL 90 python3 \
            $tree/scripts/decode_probe.py /tmp/synth/$t.gguf --tokens ${TOKENS:-128} --no-reference \
            $([ "${STREAM:-0}" = 1 ] && echo --stream) 2>&1 | grep -E "^(kernels|stream)" | tee -a $OUT/ab.log
          [ -n "${BATCHES:-}" ] || continue
          env ${setting//,/ } PYTHONPATH=/tmp/mlxsite:$tree "${pin[@]}" timeout -s KILL 150 python3 $tree/scripts/batch_decode.py /tmp/synth/$t.gguf \
            --batches $BATCHES --routes ${ROUTES:-kernels} --tokens ${BATCH_TOKENS:-128} --json $OUT/ab.jsonl 2>&1 \
            | grep "^|" | tee -a $OUT/ab.log
        done
      done
    done
    # issue 14's bars from every batched line so far, a row per model, tree and settings
    [ -z "${BATCHES:-}" ] || python3 scripts/batch_decode.py - --bars $OUT/ab.jsonl | tee -a $OUT/ab.log ;;
  pace)
    [ -n "${PACE:-}" ] || { echo "pace: set PACE, e.g. PACE=\"X=1 RWKV_MLX_PARTS_IN_PROLOGUE=1\""; exit 2; }
    bash "$0" wait "$@" || exit 2
    pin=(); [ -n "${PIN:-}" ] && pin=(taskset -c "$PIN")
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu --format=csv \
      -lms 250 >> $OUT/pace-clocks.csv 2>&1 & smi=$!
    for t in "$@"; do
      for setting in $PACE; do
        echo "== $t $setting ($(date -u +%T))" | tee -a $OUT/pace.log
        env ${setting//,/ } PYTHONPATH=/tmp/mlxsite:$PWD "${pin[@]}" timeout -s KILL 200 python3 scripts/decode_pace.py \
          /tmp/synth/$t.gguf --sequence ${SEQ:-1 16 1 16 1 16 64} --tokens ${BATCH_TOKENS:-128} ${PACE_ARGS:-} 2>&1 \
          | grep -E "^\||^host|Error" | grep -v "^|---" | tee -a $OUT/pace.log
      done
    done
    kill $smi ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
