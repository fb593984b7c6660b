#!/usr/bin/env bash
# One GPU window refreshes the whole book, in order of importance, inside one 10-minute command:
#   (1) train and measure every book-checkpoint recipe and candidate   python -m vitdiff.book run --recipes ...
#   (2) execute every notebook at the full budget                      python -m vitdiff.book run --skip-checkpoints
#   (3) the CUDA benchmarks against timm / diffusers, with MFU          bench/*_throughput.py
# Each phase has its own deadline, so a slow phase cannot cost the results of the earlier ones, and each
# phase's results are packed into $OUT as soon as it ends.
#
# Prepare on the CPU machine (see README, "Refreshing the book on a GPU"):
#   gpu_carry/data/{MNIST,FashionMNIST}/raw/*.gz and gpu_carry/data/evaluators/   (the data root there)
#   gpu_carry/whl/*.whl                                                             (packages the GPU image lacks)
# Knobs for a rehearsal on the CPU: BUDGET=quick RECIPES=shapes_vae ONLY=01 TOTAL_SECONDS=300.
set -u
OUT=${OUT:-/tmp/gpu_refresh_out}
mkdir -p "$OUT"
START=$(date +%s)
TOTAL_SECONDS=${TOTAL_SECONDS:-565}   # the device tool stops a command at 600 s
BUDGET=${BUDGET:-full}
JOBS=${JOBS:-8}
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_SECONDS - $(date +%s) + START )); }
say() { echo "[$(elapsed) s] $*"; }

if [ -d gpu_carry/whl ] && ls gpu_carry/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        gpu_carry/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export VITDIFF_DATA=${VITDIFF_DATA:-$PWD/gpu_carry/data} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PY:-python3}
{
    say "setup done"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} 2>&1 | tee "$OUT/recipes.log"

# (1) every recipe and candidate, JOBS at a time (a latent model waits for its VAE)
RECIPES=${RECIPES:-$($PY -c "from vitdiff.pretrained import RECIPES, CANDIDATES; print(','.join([*RECIPES, *CANDIDATES]))")}
mkdir -p /tmp/no-notebooks
say "(1) recipes: $RECIPES" | tee -a "$OUT/recipes.log"
timeout $(( $(left) - 300 > 60 ? $(left) - 300 : 60 )) $PY -m vitdiff.book run --budget "$BUDGET" --jobs "$JOBS" \
    --recipes "$RECIPES" --notebook-dir /tmp/no-notebooks 2>&1 | tee -a "$OUT/recipes.log"
tar cf - vitdiff/checkpoints | split -b 15m - "$OUT/checkpoints.tar."
say "(1) done, checkpoints packed" | tee -a "$OUT/recipes.log"

# (2) every notebook at the full budget, JOBS at a time, written back in place (a failed one keeps its outputs)
NB_TIMEOUT=$(( $(left) - 110 ))
say "(2) notebooks, ${NB_TIMEOUT} s each at most" | tee "$OUT/notebooks.log"
timeout $(( NB_TIMEOUT + 20 )) $PY -m vitdiff.book run --budget "$BUDGET" --jobs "$JOBS" --skip-checkpoints \
    --timeout "$NB_TIMEOUT" ${ONLY:+--only "$ONLY"} 2>&1 | tee -a "$OUT/notebooks.log"
tar czf "$OUT/notebooks.tgz" notebooks/*.ipynb
say "(2) done, notebooks packed" | tee -a "$OUT/notebooks.log"

# (3) benchmarks, as long as time is left (each ratio from one run; MFU on a known GPU)
{
    say "(3) benchmarks, $(left) s left"
    for bench in "dit_throughput.py" "mmdit_throughput.py" "unet_throughput.py" "vit_throughput.py --amp" \
                 "dit_throughput.py --compile --configs XL2-32"; do
        [ "$(left)" -gt 25 ] || { say "no time left for $bench"; continue; }
        say "bench/$bench"
        timeout $(( $(left) - 15 )) $PY bench/$bench 2>&1 | grep -v "it/s\]" 
    done
} 2>&1 | tee "$OUT/bench.log"
tar czf "$OUT/logs.tgz" -C "$VITDIFF_DATA" book-logs $(cd "$VITDIFF_DATA" && ls -d book-failed 2>/dev/null) 2>/dev/null
say "all done" | tee -a "$OUT/bench.log"
