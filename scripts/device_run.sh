#!/usr/bin/env bash
# The GPU recipe, run on the device machine from the repo root after the staged wheels are installed
# (see README "GPU"): bash scripts/device_run.sh PHASE
#   smoke    imports, the 0.5b model, one vLLM start (fills the kernel caches)
#   loop     one GPU: pytest -m gpu (SKIP_PYTEST=1: not), configs/grpo_gpu.yaml (+ report), trainer vs bare Megatron-core
#   bench    one GPU: rollout vs bare vLLM, colocated weight update vs vLLM's IPC push ($SIZES, default 0.5b 1.5b 7b)
#   weights  one GPU: the weight-update benchmark alone ($SIZES; a size's model is made on the GPU when missing), then
#            benchmarks/bench_load_plan.py on $LOAD_PLAN_SIZES if set (e.g. "0.5b 7b": the models the first made)
#   single   loop then bench on GPU 0 (a one-GPU machine)
#   pair     loop on GPU 0 and bench on GPU 1 at the same time (a two-GPU machine: half the wall time)
#   multi    two GPUs: $PARTS of tp (Megatron TP=2/DP=2), nccl (split-placement push), grpo_nccl
#            (configs/grpo_2gpu_nccl.yaml), pd (prefill GPU 0, decode GPU 1), pd_equal (the same in fp32, greedy),
#            async (benchmarks/async_vs_sync.py --gpu: sync vs async on grpo_2gpu_nccl, $STEPS steps each)
#   async1   one GPU: the same benchmark with the trainer and the engine sharing the GPU, disk pushes
#   variants one GPU: $RECIPE once per $VARIANTS entry ("name:key=value,key=value name2:..."), metrics kept
#   sglang   one GPU: the engine contract suite on real SGLang and vLLM, then benchmarks/engines.py ($PARTS of suite,
#            serve, grpo ($ENGINES, default "vllm sglang"), moe_r3 (benchmarks/moe_r3.py on $MOE_RECIPE); then report). SGLang's own site-packages: VIME_SGLANG_PYTHONPATH
#            (default /tmp/site_sgl). Parts without vLLM (grpo with ENGINES=sglang, moe_r3 on an SGLang recipe) need
#            only the trainer's wheels in /tmp/site: ../shared/device/stage.sh .stage_min megatron-core==0.16.1 ray==2.52.1
#            pydantic pyyaml tqdm tensorboard psutil fastapi uvicorn (2 parts instead of vLLM's 11)
# Results (JSON, PNG, logs) go to /tmp/results/PHASE and are re-packed into $OUT/PHASE.tgz after every part, so a
# call cut off at its limit still returns what finished.
set -uo pipefail
phase=${1:?usage: device_run.sh smoke|loop|bench|weights|single|pair|multi|async1|variants|sglang}
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_DEDUP_LOGS=0
# FlashInfer's top-k/top-p sampler is JIT-built at the first engine start (two minutes on a fresh machine); vime's
# rollouts sample at plain temperature, which never reaches it.
export VLLM_USE_FLASHINFER_SAMPLER=0
export VIME_MODELS=/tmp/models VIME_BENCH_OUT=/tmp/results/$phase
mkdir -p "$VIME_BENCH_OUT" "$VIME_MODELS"
py=python3

ancestors() { local p=$$; while [ "$p" -gt 1 ]; do echo "$p"; p=$(awk '/^PPid:/{print $2}' /proc/$p/status); done; }
cleanup() {  # nothing of a finished or killed part may keep GPU memory
  if [ -n "${VIME_SCOPE:-}" ]; then  # a branch of `pair`: only what this branch started (its env carries the tag)
    local keep; keep=" $(ancestors | tr '\n' ' ') "
    for p in $(grep -lzx "VIME_SCOPE=$VIME_SCOPE" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
      [[ $keep == *" $p "* ]] || kill -9 "$p" 2>/dev/null
    done
  else  # patterns bracketed: never match this shell
    pkill -9 -f "[v]llm.entrypoints"; pkill -9 -f "[e]ngines.vllm.serve_main"; pkill -9 -f "[E]ngineCore"; pkill -9 -f "[v]llm-router"
    pkill -9 -f "[e]ngines.sglang.launch"; pkill -9 -f "[s]glang::"
    ray stop --force >/dev/null 2>&1
    nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
  fi
  sleep 1
}
pack() { [ -n "${OUT:-}" ] && tar -C /tmp/results -czf "$OUT/$phase.tgz.part" "$phase" && mv "$OUT/$phase.tgz.part" "$OUT/$phase.tgz"; }
step() {  # step NAME TIMEOUT CMD...: run one part, keep going on failure, log it
  local name=$1 t=$2; shift 2
  echo "=== $phase/$name ($(date +%T))"
  timeout -k 10 "$t" "$@" > "$VIME_BENCH_OUT/$name.log" 2>&1; local rc=$?
  tail -n 15 "$VIME_BENCH_OUT/$name.log" | cut -c1-400; echo "=== $phase/$name rc=$rc ($(date +%T))"; cleanup; pack
}
model05() { [ -f $VIME_MODELS/qwen2-0.5b/config.json ] || $py -m vime.cli make-model --size 0.5b --dtype bfloat16 \
  --device cuda --out $VIME_MODELS/qwen2-0.5b; }
loop() {
  [ -n "${SKIP_PYTEST:-}" ] || step pytest_gpu 240 $py -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  step grpo_gpu 220 $py -m vime.cli train -c configs/grpo_gpu.yaml --set model.path=$VIME_MODELS/qwen2-0.5b \
    --set run.out_dir=/tmp/runs/grpo_gpu
  cp /tmp/runs/grpo_gpu/metrics.jsonl "$VIME_BENCH_OUT/grpo_gpu_metrics.jsonl"
  cp /tmp/runs/grpo_gpu/run.png "$VIME_BENCH_OUT/grpo_gpu_run.png" 2>/dev/null
  step grpo_report 30 $py benchmarks/gpu_grpo_report.py /tmp/runs/grpo_gpu gpu_grpo
  step trainer 200 $py benchmarks/bench_gpu_trainer.py $VIME_MODELS/qwen2-0.5b
}
bench() {
  step rollout 170 $py benchmarks/bench_gpu_rollout.py $VIME_MODELS/qwen2-0.5b
  step weights 330 $py benchmarks/bench_gpu_weights.py ${SIZES:-0.5b 1.5b 7b}
}
cleanup  # a part killed in an earlier call may have left an engine behind
case $phase in
  smoke)
    nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m
    $py -c "import vllm, megatron.core, ray, torch; print('vllm', vllm.__version__, 'mcore', megatron.core.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
    model05
    step vllm_start 420 $py -c "
from engines.vllm.server import VLLMServer
import time; t = time.time()
with VLLMServer('$VIME_MODELS/qwen2-0.5b', args={'enforce_eager': True, 'dtype': 'bfloat16', 'max_model_len': 512,
    'gpu_memory_utilization': 0.3, 'worker_extension_cls': 'engines.vllm.worker_ext.VimeWorkerExtension',
    'weight_transfer_config': {'backend': 'vime_ipc'}}, env={'VLLM_ALLOW_INSECURE_SERIALIZATION': '1'},
    log_path='$VIME_BENCH_OUT/vllm_smoke.log', startup_timeout_s=400) as s:
    import httpx; from vime.secret import auth_headers
    print('started in', round(time.time() - t), 's;', httpx.get(s.base_url + '/v1/models', headers=auth_headers()).json()['data'][0]['id'])
" ;;
  loop) export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}; model05; loop ;;
  bench) export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}; model05; bench ;;
  weights) export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
    step weights ${WEIGHTS_TIMEOUT:-560} $py benchmarks/bench_gpu_weights.py ${SIZES:-0.5b 1.5b 7b}
    [ -n "${LOAD_PLAN_SIZES:-}" ] && step load_plan 240 $py benchmarks/bench_load_plan.py $LOAD_PLAN_SIZES ;;
  single) export CUDA_VISIBLE_DEVICES=0; model05; loop; bench ;;
  pair)  # two branches, each with its own GPU, Ray cluster (RAY_TMPDIR) and cleanup scope
    model05
    CUDA_VISIBLE_DEVICES=0 VIME_SCOPE=g0 RAY_TMPDIR=/tmp/ray_g0 bash "$here/device_run.sh" loop & a=$!
    sleep 20  # the engines' first starts fill the same kernel caches: let the first one begin alone
    CUDA_VISIBLE_DEVICES=1 VIME_SCOPE=g1 RAY_TMPDIR=/tmp/ray_g1 bash "$here/device_run.sh" bench & b=$!
    wait $a $b ;;
  multi)
    model05
    for part in ${PARTS:-tp nccl grpo_nccl pd pd_equal}; do
      case $part in
        grpo_nccl)
          step grpo_nccl 200 $py -m vime.cli train -c configs/grpo_2gpu_nccl.yaml \
            --set model.path=$VIME_MODELS/qwen2-0.5b --set run.out_dir=/tmp/runs/grpo_nccl
          cp /tmp/runs/grpo_nccl/metrics.jsonl "$VIME_BENCH_OUT/grpo_nccl_metrics.jsonl" 2>/dev/null
          step grpo_nccl_report 30 $py benchmarks/gpu_grpo_report.py /tmp/runs/grpo_nccl multigpu_grpo_nccl ;;
        nccl) step nccl 260 $py benchmarks/bench_multigpu.py nccl ;;
        async) step async_vs_sync ${ASYNC_TIMEOUT:-540} $py benchmarks/async_vs_sync.py --gpu --steps ${STEPS:-30} \
            --out /tmp/runs/async --set model.path=$VIME_MODELS/qwen2-0.5b
          for m in sync async; do cp /tmp/runs/async/$m.log "$VIME_BENCH_OUT/async_run_$m.log"
            cp /tmp/runs/async/$m/metrics.jsonl "$VIME_BENCH_OUT/async_run_${m}_metrics.jsonl"; done 2>/dev/null ;;
        *) step "$part" 200 $py benchmarks/bench_multigpu.py "$part" ;;
      esac
    done ;;
  async1)  # one GPU: sync vs async with the trainer and the engine sharing it (half each), disk pushes
    model05
    step async_vs_sync ${ASYNC_TIMEOUT:-540} $py benchmarks/async_vs_sync.py --gpu --steps ${STEPS:-30} \
      --out /tmp/runs/async --set model.path=$VIME_MODELS/qwen2-0.5b --set engine.gpus_per_engine=0.5 \
      --set trainer.gpus_per_rank=0.5 --set weights.backend=disk --set engine.args.gpu_memory_utilization=0.35
    for m in sync async; do cp /tmp/runs/async/$m.log "$VIME_BENCH_OUT/async_run_$m.log"
      cp /tmp/runs/async/$m/metrics.jsonl "$VIME_BENCH_OUT/async_run_${m}_metrics.jsonl"; done 2>/dev/null ;;
  sglang)
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} VIME_SGLANG_PYTHONPATH=${VIME_SGLANG_PYTHONPATH:-/tmp/site_sgl}
    [ "${PARTS:-}" = moe_r3 ] || model05
    for part in ${PARTS:-suite serve grpo}; do
      case $part in
        suite) step suite 420 $py -m pytest -q -x -m gpu tests/test_engine_suite.py -k gpu -p no:cacheprovider ;;
        serve) step serve 420 $py benchmarks/engines.py serve --model $VIME_MODELS/qwen2-0.5b ;;
        grpo) step grpo 560 $py benchmarks/engines.py grpo --model $VIME_MODELS/qwen2-0.5b --steps ${STEPS:-30} \
            --engines ${ENGINES:-vllm sglang}
          cp /tmp/runs/engines_*/metrics.jsonl "$VIME_BENCH_OUT/" 2>/dev/null ;;
        moe_r3)  # routing replay on and off on a random 0.5B-shaped $MOE_ARCH (qwen3_moe, glm4_moe, deepseek_v3)
          arch=${MOE_ARCH:-qwen3_moe}; m=$VIME_MODELS/${arch//_/-}-0.5b
          recipe=${MOE_RECIPE:-configs/grpo_moe_gpu.yaml}; env=()  # an SGLang server needs its own site first
          label=$arch; [[ $recipe == *sglang* ]] || label=${arch}_vllm  # moe_r3_<card>[_<label>].json
          name=(); [ "$label" = qwen3_moe ] || name=(--name "$label")
          [ -f $m/config.json ] || $py -m vime.cli make-model --arch $arch --size 0.5b --dtype bfloat16 --device cuda \
            --out $m
          [[ $recipe == *sglang* ]] && env=(--set "engine.env.PYTHONPATH=$VIME_SGLANG_PYTHONPATH:$PWD")
          step moe_r3_$arch ${MOE_TIMEOUT:-540} $py benchmarks/moe_r3.py --gpu --recipe $recipe --steps ${MOE_STEPS:-10} \
            --sft-steps ${MOE_SFT:-20} --out /tmp/runs/moe_r3_$arch --set model.path=$m "${name[@]}" "${env[@]}"
          (cd /tmp/runs && find moe_r3_$arch \( -name '*.log' -o -name '*.jsonl' \) -print0 |
            tar --null -czf "$VIME_BENCH_OUT/moe_r3_${arch}_logs.tgz" -T -); pack ;;
      esac
    done
    [ -f "$VIME_BENCH_OUT/engines_serve.json" ] && [ -f "$VIME_BENCH_OUT/engines_grpo.json" ] &&
      step report 60 $py benchmarks/engines.py report --src "$VIME_BENCH_OUT" --out "$VIME_BENCH_OUT" ;;
  variants)  # one GPU: $RECIPE (default configs/grpo_gpu.yaml) once per entry of $VARIANTS, "name:key=v,key=v ..."
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}; model05
    for v in ${VARIANTS:?name:key=value,... per variant}; do
      name=${v%%:*}; sets=(); IFS=, read -ra kv <<< "${v#*:}"; for x in "${kv[@]}"; do sets+=(--set "$x"); done
      step "variant_$name" ${VARIANT_TIMEOUT:-280} $py -m vime.cli train -c ${RECIPE:-configs/grpo_gpu.yaml} \
        --set model.path=$VIME_MODELS/qwen2-0.5b --set run.out_dir=/tmp/runs/$name "${sets[@]}"
      cp /tmp/runs/$name/metrics.jsonl "$VIME_BENCH_OUT/variant_${name}_metrics.jsonl" 2>/dev/null; pack
    done ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
[ -n "${VIME_SCOPE:-}" ] || cleanup
pack; [ -n "${OUT:-}" ] && ls -la "$OUT"
for f in "$VIME_BENCH_OUT"/*.json; do [ -f "$f" ] && { echo "--- $f"; head -c 2500 "$f"; echo; }; done
exit 0
