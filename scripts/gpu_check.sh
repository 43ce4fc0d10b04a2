#!/usr/bin/env bash
# The one prepared GPU session: GPU tests, then speed (ours vs mergekit --cuda), WUDI solver and
# RI adaptation timings. Every result lands in $OUT as soon as it exists, so a run cut short
# still reports what it measured. Needs only what a CUDA PyTorch image has, plus the wheels in
# .whl/ (pydantic for the recipe schema, mergekit for the comparison) when present:
#     OUT=gpu-out bash scripts/gpu_check.sh
# PARAMS (default 250M) and REPS (3) size the speed run; ONLY="tests speed profile wudi ri" picks steps.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
cat > /tmp/mergekit-yaml <<'SH'
#!/bin/sh
exec python3 -c "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())" "$@"
SH
chmod +x /tmp/mergekit-yaml
PARAMS=${PARAMS:-250M}
REPS=${REPS:-3}
ONLY=${ONLY:-tests speed profile wudi ri}
want() { [[ " $ONLY " == *" $1 "* ]]; }
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/steps.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/machine.txt" 2>&1
if want tests; then
  stamp "tests"
  timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py tests/test_native.py \
    tests/test_reference.py > "$OUT/tests.txt" 2>&1
  # NaN/Inf detection on the device path (device auto = cuda here: torch checks, no C kernel)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_adversarial_io.py -k nonfinite \
    > "$OUT/tests_nonfinite.txt" 2>&1
  stamp "tests rc=$?"
fi
if want speed; then
  timeout 300 python3 scripts/bench_speed.py --device cuda --params "$PARAMS" --reps "$REPS" --markdown \
    --mergekit /tmp/mergekit-yaml --workdir /tmp/bench --out "$OUT/speed_cuda_$PARAMS.md" > "$OUT/speed_cuda_$PARAMS.log" 2>&1
  stamp "speed rc=$?"
fi
if want profile; then  # where a GPU TIES merge spends its time (after the speed run made the models)
  recipe=$(ls /tmp/bench/recipes/ties.yaml 2>/dev/null)
  [ -n "$recipe" ] && timeout 60 python3 -m cProfile -s cumtime -m mergekit_ri.cli merge "$recipe" -o /tmp/prof-out \
    --force --quiet --device cuda 2>&1 | head -60 > "$OUT/profile_ties_cuda.txt"
  stamp "profile"
fi
if want wudi; then
  timeout 100 python3 scripts/bench_wudi.py --device cuda --budget 80 --out "$OUT/bench_wudi_cuda.md" > "$OUT/wudi.log" 2>&1
  stamp "wudi rc=$?"
fi
if want ri; then
  timeout 90 python3 scripts/bench_ri.py --device cuda --out "$OUT/bench_ri.md" > "$OUT/ri.log" 2>&1
  stamp "ri rc=$?"
fi
