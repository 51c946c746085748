#!/usr/bin/env bash
# The GPU check (issue 19), about 8 minutes on one GPU: the test files that train with torch, run on CUDA; then the
# GPU benchmark rows (20M-interaction synthetic set: EASE, ALS, SASRec, full-ranking evaluation; ML-100K
# leave-one-out: SASRec and GRU4Rec tuned + refitted, the SASRec epoch time). Output lands in OUT as text and JSON.
#
#   bash benchmarks/device_check.sh [OUT] [DATA]   # DATA: a folder holding ml-100k/ (default ../shared/data)
#
# On a machine whose Python has torch with CUDA but lacks some of recforge's dependencies, first run
# scripts/device_wheels.sh here and carry .whl/: the wheels are installed into /tmp/site. See docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/device}
DATA=${2:-../shared/data}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" RECFORGE_DEVICE=cuda RECFORGE_BENCH_DATA="$DATA" PYTHONUNBUFFERED=1
python3 -c "import torch, recforge; print('recforge', recforge.__version__, '| torch', torch.__version__, '|',
torch.cuda.get_device_name(0), '|', torch.cuda.device_count(), 'GPU(s)')" 2>&1 | tee "$OUT/device.txt"

echo "== tests on CUDA (RECFORGE_DEVICE=cuda)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_sequential.py tests/test_two_tower.py \
  tests/test_distributed.py tests/test_model_contract.py tests/test_core.py tests/test_device_ranking.py \
  tests/test_neighbors.py tests/test_graph.py tests/test_linear.py tests/test_als.py tests/test_bpr.py \
  tests/test_pointwise.py 2>&1 | tail -40 | tee "$OUT/tests.txt"

echo "== 20M synthetic: EASE, ALS, SASRec (logQ and full softmax), evaluation"
timeout 150 python3 benchmarks/bench_scale.py --out "$OUT/scale.json" 2>&1 | grep -v "it/s" | tee "$OUT/scale.txt"
timeout 60 python3 benchmarks/bench_scale.py --models sasrec --sasrec-loss softmax --eval-users 1000 \
  --out "$OUT/scale_softmax.json" 2>&1 | grep -v "it/s" | tail -4 | tee -a "$OUT/scale.txt"

echo "== 20M synthetic: ALS, then the full-ranking evaluation of all 200k users on the GPU"
timeout 90 python3 benchmarks/bench_scale.py --models als --eval-users 200000 --out "$OUT/scale_eval_all.json" 2>&1 \
  | grep -v "it/s" | tail -4 | tee -a "$OUT/scale.txt"

echo "== ML-100K leave-one-out: SASRec, GRU4Rec (tuned on validation, refitted), SASRec epoch time"
timeout 150 python3 benchmarks/bench_sequential.py --datasets ml-100k --parts loo,speed --neural "SASRec softmax,GRU4Rec" \
  --threads 4 --work /tmp/recforge-gpu-trials --out "$OUT/sequential.json" 2>&1 | tail -30 | tee "$OUT/sequential.txt"
