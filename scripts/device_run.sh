#!/usr/bin/env bash
# The GPU recipe, run on the device machine from the repo root after the staged wheels are installed
# (see README "GPU"): bash scripts/device_run.sh PHASE
#   smoke    imports, the 0.5b model, one vLLM start (fills the kernel caches: the first start takes minutes)
#   single   one GPU: pytest -m gpu, configs/grpo_gpu.yaml, rollout and trainer benchmarks
#   weights  one GPU: colocated weight update vs vLLM's IPC push, 0.5b / 1.5b / 7b
#   multi    two GPUs: Megatron TP=2/DP=2, NCCL push with split placement, configs/grpo_2gpu_nccl.yaml, P/D
# Results (JSON, PNG, logs) go to $VIME_BENCH_OUT and are packed into $OUT/PHASE.tgz.
set -uo pipefail
phase=${1:?usage: device_run.sh smoke|single|weights|multi}
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_DEDUP_LOGS=0
export VIME_MODELS=/tmp/models VIME_BENCH_OUT=/tmp/results/$phase
mkdir -p "$VIME_BENCH_OUT" "$VIME_MODELS"
py=python3
cleanup() {  # nothing of a finished or killed part may keep GPU memory (patterns bracketed: never match this shell)
  pkill -9 -f "[v]llm.entrypoints"; pkill -9 -f "[E]ngineCore"; pkill -9 -f "[v]llm-router"
  ray stop --force >/dev/null 2>&1
  nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null; sleep 1
}
step() {  # step NAME TIMEOUT CMD...: run one part, keep going on failure, log it
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout -k 10 "$t" "$@" > "$VIME_BENCH_OUT/$name.log" 2>&1; local rc=$?
  tail -n 25 "$VIME_BENCH_OUT/$name.log"; echo "=== $name rc=$rc"; cleanup
}
cleanup  # a part killed in an earlier call may have left an engine behind
model05() { [ -f $VIME_MODELS/qwen2-0.5b/config.json ] || $py -m vime.cli make-model --size 0.5b --dtype bfloat16 \
  --device cuda --out $VIME_MODELS/qwen2-0.5b; }
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
    import httpx; print('started in', round(time.time() - t), 's;', httpx.get(s.base_url + '/v1/models').json()['data'][0]['id'])
" ;;
  single)
    export CUDA_VISIBLE_DEVICES=0
    model05
    step pytest_gpu 200 $py -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
    step grpo_gpu 200 $py -m vime.cli train -c configs/grpo_gpu.yaml --set model.path=$VIME_MODELS/qwen2-0.5b \
      --set run.out_dir=/tmp/runs/grpo_gpu
    cp /tmp/runs/grpo_gpu/metrics.jsonl "$VIME_BENCH_OUT/grpo_gpu_metrics.jsonl"; cp /tmp/runs/grpo_gpu/run.png "$VIME_BENCH_OUT/grpo_gpu_run.png"
    step grpo_report 30 $py benchmarks/gpu_grpo_report.py /tmp/runs/grpo_gpu gpu_grpo
    step rollout 150 $py benchmarks/bench_gpu_rollout.py $VIME_MODELS/qwen2-0.5b ;;
  weights)
    export CUDA_VISIBLE_DEVICES=0
    step trainer 150 $py benchmarks/bench_gpu_trainer.py $VIME_MODELS/qwen2-0.5b
    step weights 400 $py benchmarks/bench_gpu_weights.py ${SIZES:-0.5b 1.5b 7b} ;;
  multi)
    model05
    step tp 200 $py benchmarks/bench_multigpu.py tp
    step nccl 240 $py benchmarks/bench_multigpu.py nccl
    step grpo_nccl 200 $py -m vime.cli train -c configs/grpo_2gpu_nccl.yaml --set model.path=$VIME_MODELS/qwen2-0.5b \
      --set run.out_dir=/tmp/runs/grpo_nccl
    [ -f /tmp/runs/grpo_nccl/metrics.jsonl ] && cp /tmp/runs/grpo_nccl/metrics.jsonl "$VIME_BENCH_OUT/grpo_nccl_metrics.jsonl"
    step pd 200 $py benchmarks/bench_multigpu.py pd ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
cleanup
[ -n "${OUT:-}" ] && tar -C /tmp/results -czf "$OUT/$phase.tgz" "$phase" && ls -la "$OUT"
for f in "$VIME_BENCH_OUT"/*.json; do [ -f "$f" ] && { echo "--- $f"; head -c 3000 "$f"; echo; }; done
exit 0
