#!/usr/bin/env bash
# The GPU check (issue 19) on one GPU, in parts run in the order given (default: all of them, in this order, which
# puts what the issue's targets need first, so a run stopped by its time limit loses the least):
#   tests       the test files that train or rank with torch, run on CUDA (180 s at most)
#   sasrec      SASRec on ML-100K with and without CUDA graphs, batches of 128, repeatability (deterministic=True) (90 s)
#   rectools    when .whl-peers/ was carried: RecTools' SASRec on the same split and the per-epoch ratio (75 s)
#   sequential  SASRec and GRU4Rec tuned + refitted on ML-100K leave-one-out (80 s)
#   compare     the whole `recforge compare` leaderboard on ml-latest-small with SASRec and GRU4Rec (85 s)
#   scale       the 20M-interaction synthetic set: EASE, ALS, BPR, BiasedALS, FunkSVD, SASRec logQ and full
#               softmax, full-ranking evaluation of all 200k users (170 s)
#   implicit    when .whl-implicit/ was carried: implicit's ALS (on the GPU when its CUDA kernels load) and
#               recforge's on the same 20M set, and the ratio (150 s)
# All of them take about 14 minutes, more than one device call may run: split them over two calls, e.g.
# `tests,sasrec,rectools,sequential` then `compare,scale,implicit`. The log and the JSON results land in OUT
# (check.txt, gpu_sasrec.json, rectools_gpu.json, sequential.json, compare.md, compare_trials.csv (or, when the
# compare was stopped by its limit, compare_trials_partial.csv), scale.json, implicit_gpu.json).
#
#   bash benchmarks/device_check.sh [OUT] [DATA] [PARTS]   # DATA: a folder holding ml-100k/ (default ../shared/data)
#
# On a machine whose Python has torch with CUDA but lacks some of recforge's dependencies, first run
# scripts/device_wheels.sh here and carry .whl/: the wheels are installed into /tmp/site. See docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/device}
DATA=${2:-../shared/data}
PARTS=${3:-tests,sasrec,rectools,sequential,compare,scale,implicit}
for part in ${PARTS//,/ }; do
  case "$part" in
    tests|sasrec|rectools|sequential|compare|scale|implicit) ;;
    *) echo "unknown part '$part': choose from tests, sasrec, rectools, sequential, compare, scale, implicit" >&2
       exit 2 ;;
  esac
done
mkdir -p "$OUT"
LOG="$OUT/check.txt"
START=$SECONDS
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" RECFORGE_DEVICE=cuda RECFORGE_BENCH_DATA="$DATA" PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # before any GPU work: deterministic=True relies on it
step() { echo "== [$((SECONDS - START)) s] $*" | tee -a "$LOG"; }
python3 -c "import torch, recforge; print('recforge', recforge.__version__, '| torch', torch.__version__, '|',
torch.cuda.get_device_name(0), '|', torch.cuda.device_count(), 'GPU(s)')" 2>&1 | tee -a "$LOG"

tests() {
  step "tests on CUDA (RECFORGE_DEVICE=cuda)"
  # -v: every test's outcome is logged as it ends, so a run stopped by its time limit still names its failures;
  # the gloo test trains three CPU processes (RECFORGE_DEVICE=cpu): the CPU suite covers it
  timeout 180 python3 -m pytest -v -p no:cacheprovider -n 8 --durations=10 tests/test_sequential.py tests/test_graphs.py \
    tests/test_two_tower.py tests/test_distributed.py tests/test_model_contract.py tests/test_core.py \
    tests/test_device_ranking.py tests/test_neighbors.py tests/test_graph.py tests/test_linear.py tests/test_als.py \
    tests/test_bpr.py tests/test_pointwise.py "tests/test_sgd_mf.py::test_the_torch_funk_epoch_in_blocks_of_one_is_the_numba_epoch" \
    --deselect tests/test_distributed.py::test_two_gloo_processes_match_one_process \
    2>&1 | grep -v " PASSED " | tee -a "$LOG"
}

sasrec() {
  step "ML-100K LOO validation: SASRec with and without CUDA graphs, batches of 128, repeatability with deterministic=True (bench_gpu.py)"
  timeout 90 python3 benchmarks/bench_gpu.py \
    --configs default,eager,batch128,deterministic,deterministic-again --out "$OUT/gpu_sasrec.json" 2>&1 | tee -a "$LOG"
}

# peer_wheels FOLDER PART TARGET: a side-by-side part's carried wheels installed into a folder of their own (put
# first on that part's path only); false, with a line saying so, when FOLDER was not carried
peer_wheels() {
  if ! ls "$1"/*.whl > /dev/null 2>&1; then
    step "$2: skipped, $1/ was not carried (scripts/device_wheels.sh fills it)"
    return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$3" "$1"/*.whl \
    2>&1 | tee -a "$LOG"
}

rectools() {
  step "ML-100K LOO: RecTools 0.19 SASRec on the GPU, same split (peers_rectools_seq.py), and the per-epoch ratio"
  peer_wheels .whl-peers rectools /tmp/peers-site || return
  PYTHONPATH="/tmp/peers-site:$PYTHONPATH" timeout 75 python3 benchmarks/peers_rectools_seq.py --datasets ml-100k \
    --models sasrec --device cuda --threads 4 --epochs 20,40,80 --out "$OUT/rectools_gpu.json" 2>&1 | tee -a "$LOG"
  python3 - "$OUT/gpu_sasrec.json" "$OUT/rectools_gpu.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
if not Path(sys.argv[1]).exists():
    sys.exit("no ratio: the sasrec part did not run before rectools in this call (its gpu_sasrec.json is missing)")
ours = next(r for r in json.load(open(sys.argv[1])) if r["config"] == "default" and "error" not in r)
peer = max(json.load(open(sys.argv[2]))["ml-100k"]["sasrec"]["tuning"], key=lambda t: t["epochs"])
theirs = peer["fit_seconds"] / peer["epochs"]
print(f"s/epoch: recforge {ours['train s/epoch']:.4f} training ({ours['s/epoch']:.4f} with validation), RecTools "
      f"{theirs:.4f}: recforge/RecTools = {ours['train s/epoch'] / theirs:.2f} ({ours['s/epoch'] / theirs:.2f})")
PY
}

sequential() {
  step "ML-100K leave-one-out: SASRec, GRU4Rec (tuned on validation, refitted), SASRec epoch time"
  timeout 80 python3 benchmarks/bench_sequential.py --datasets ml-100k --parts loo,speed --neural "SASRec softmax,GRU4Rec" \
    --threads 4 --work /tmp/recforge-gpu-trials --out "$OUT/sequential.json" 2>&1 | tee -a "$LOG"
}

compare() {
  step "ml-latest-small LOO: the whole recforge compare leaderboard with SASRec and GRU4Rec"
  local t0=$SECONDS
  timeout 85 python3 -m recforge compare --models random,pop,itemknn,ease,als,bpr,funksvd,sasrec,gru4rec \
    --workers 8 --overwrite --out /tmp/recforge-gpu-compare 2>&1 | tee -a "$LOG"
  echo "compare: $((SECONDS - t0)) s" | tee -a "$LOG"
  cp /tmp/recforge-gpu-compare/leaderboard.md "$OUT/compare.md" 2>/dev/null
  cp /tmp/recforge-gpu-compare/trials.csv "$OUT/compare_trials.csv" 2>/dev/null \
    || python3 - /tmp/recforge-gpu-compare/trials "$OUT/compare_trials_partial.csv" <<'PY' 2>&1 | tee -a "$LOG"
# stopped by its time limit: what finished, from the trials saved as they ended
import json, pathlib, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))]
lines = ["model,part,seconds,pruned,epochs"] + [f"{r['model']},{r['part']},{r['seconds']:.1f},{r.get('pruned')},"
                                                 f"{len(r.get('curve') or [])}" for r in rows]
pathlib.Path(sys.argv[2]).write_text("\n".join(lines) + "\n")
by = {}
for r in rows:
    by.setdefault(r["model"], []).append(r["seconds"])
print("compare stopped early; finished trials:", {m: f"{len(s)} trials, {sum(s):.0f} s" for m, s in by.items()})
PY
}

scale() {
  step "20M synthetic: EASE, ALS, BPR, BiasedALS, FunkSVD, SASRec (logQ, full softmax), full-ranking evaluation of all 200k users"
  timeout 170 python3 benchmarks/bench_scale.py --models ease,als,bpr,biasedals,funksvd,sasrec --sasrec-loss logq,softmax \
    --eval-users 200000 --out "$OUT/scale.json" 2>&1 | grep -v "it/s" | tee -a "$LOG"
}

implicit() {
  step "20M synthetic: implicit's ALS and recforge's side by side, 64 factors, 15 iterations (peers_implicit_gpu.py)"
  peer_wheels .whl-implicit implicit /tmp/implicit-site || return
  PYTHONPATH="/tmp/implicit-site:$PYTHONPATH" timeout 150 python3 benchmarks/peers_implicit_gpu.py --threads 16 \
    --out "$OUT/implicit_gpu.json" 2>&1 | tee -a "$LOG"
}

for part in ${PARTS//,/ }; do "$part"; done
step "done"
