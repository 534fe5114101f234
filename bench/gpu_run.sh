#!/usr/bin/env bash
# The prepared GPU run: everything a lent CUDA machine should measure, in at most 8 minutes, offline.
#
#     bash bench/gpu_run.sh OUTDIR
#
# Needs a CUDA GPU and the package installed with its test extra (no network). Writes to OUTDIR, ready to
# commit under bench/results/:
#   environment.txt    nvidia-smi, torch/triton versions, python -m oodkernels (which backend runs what)
#   tests.txt          the GPU-relevant tests without the interpreter (Triton compiled for this GPU)
#   audit_check.csv    the compile audit's registers/spills next to what the CUDA driver reports for the same
#                      specialisations (bench/audit.py --check-on-gpu): the proxy CI holds, checked once
#   <gpu>_<date>.csv   bench/run.py: every family's GPU cases with bandwidth and % of roofline, plus the
#                      device-to-device copy that the roofline divides by (the `_device/copy` row)
#   summary.txt        the tail of each step and the time it took
# Each step has its own time cap (`timeout`), so a slow step leaves the others their share; a step that
# fails or times out is recorded in summary.txt and the run goes on.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_run.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu_run.sh: no CUDA device is visible to torch" | tee -a "$SUMMARY" >&2
    exit 2
fi

step() {  # step NAME SECONDS LOGFILE COMMAND...
    local name=$1 cap=$2 log=$3
    shift 3
    local start=$SECONDS
    timeout --kill-after=10 "$cap" "$@" > "$log" 2>&1
    local rc=$?
    local state="ok"
    [ "$rc" -eq 124 ] && state="TIMED OUT after ${cap}s"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && state="exit $rc"
    printf '== %s: %s (%ds)\n' "$name" "$state" "$((SECONDS - start))" | tee -a "$SUMMARY"
    tail -n 5 "$log" | sed 's/^/   /' >> "$SUMMARY"
}

{
    nvidia-smi || true
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    $PY -m oodkernels
    git rev-parse HEAD 2>/dev/null || true
} > "$OUT/environment.txt" 2>&1

# 1. the fused-kernel tests, compiled for this GPU (the contract and oracle suites run the same kernels
#    through the criteria; the interpreter-only and C++ tests skip themselves)
step tests 150 "$OUT/tests.txt" \
    $PY -m pytest -q -p no:cacheprovider -n 8 \
    tests/test_fused_rows.py tests/test_fused_extra.py tests/test_fused_scores.py tests/test_fused_centers.py \
    tests/test_contract_logits.py tests/test_contract_row_options.py tests/test_contract_distances.py

# 2. the compile audit's proxy against the real driver: registers and spills of every specialisation that
#    the quick selection launches, as this GPU's driver loaded them
step audit-check 60 "$OUT/audit_check.txt" \
    $PY bench/audit.py --quick --check-on-gpu "$OUT/audit_check.csv"

# 3. every family's GPU cases: oodkernels, the eager reference and pytorch-ood side by side, full step
#    (scores: forward without grad); the copy bandwidth row comes first in the file
step bench 150 "$OUT/bench.txt" \
    $PY bench/run.py --device cuda --out "$OUT" --modes full,no-grad --min-run-time 0.05 --warmup 2 \
    --providers oodkernels,reference,pytorch-ood \
    --filter '^(rows/.*/(65536x1000|8x19x512x1024)/|scores/.*/(65536x1000|8x19x512x1024)/bf16|scores5/.*/bf16|centers/|vos/)'

# 4. the compiled reference (torch.compile: a compile per case) on the headline shapes of SPEC §5
step bench-compiled 80 "$OUT/bench_compiled.txt" \
    $PY bench/run.py --device cuda --out "$OUT" --modes full --min-run-time 0.05 --warmup 2 \
    --providers oodkernels,reference-compiled \
    --filter '^rows/(EnergyRegularized|OutlierExposure|CrossEntropy)Loss/(65536x1000/bf16|8x19x512x1024/bf16)$'

echo "done: results in $OUT ($SECONDS s)" | tee -a "$SUMMARY"
