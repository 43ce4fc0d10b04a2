#!/usr/bin/env bash
# The one prepared GPU session, one call of under 10 minutes on one H200:
#   env       nvidia-smi, cores, memory, torch / triton versions               -> $OUT/machine.txt
#   pipeline  the 953M model (base + 3 fine-tune-like experts, 7.6 GB bf16) merged with TIES and
#             task arithmetic on the GPU after start-up, against the page cache's read bandwidth
#             (cat / dd of the same files; target >= 70 %), and the CPU's output for the same
#             recipes (scripts/gpu_pipeline.py)                   -> $OUT/pipeline.md, pipeline.json
#   tests     the CUDA tests (tests/test_gpu.py; compiled Triton in test_kernels / test_reference;
#             the staging pipeline in test_staging.py) and NaN/Inf detection on the device path
#                                                                  -> $OUT/tests.txt, tests_nonfinite.txt
# and, only when named in ONLY (they do not fit in the same 10 minutes): speed (ours vs mergekit
# --cuda, scripts/bench_speed.py), profile (cProfile of a GPU TIES merge), wudi, ri.
#
#     OUT=gpu-out bash scripts/gpu_check.sh                 # env pipeline tests
#     ONLY="speed profile" PARAMS=1B bash scripts/gpu_check.sh
#     DRY=1 OUT=/tmp/gpu-dry bash scripts/gpu_check.sh      # no GPU: a tiny model on the CPU, to check the script
#
# Every result lands in $OUT as soon as it exists, so a run cut short still reports what it
# measured; steps.txt has each step's exit code and time. Each step has its own timeout and
# none starts after BUDGET seconds (default 560). Generated models and outputs go to $WORK
# (default /tmp/gpu-check).
#
# Needs what the device image has (torch, triton, pytest, typer, rich, pyyaml, safetensors,
# numpy, huggingface_hub). ri-merge itself imports no pydantic; a typer of 0.2x does (to coerce
# option values), and the tests' schema reference does: where the image lacks it, carry its
# wheels in .whl/ (ignored by git), fetched on the development machine with
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
# (mergekit's wheels too for ONLY=speed), and name .whl in the run's carry.
set -uo pipefail
OUT=${OUT:-gpu-out}
WORK=${WORK:-/tmp/gpu-check}
BUDGET=${BUDGET:-560}
DRY=${DRY:-}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
cat > /tmp/mergekit-yaml <<'SH'
#!/bin/sh
exec python3 -c "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())" "$@"
SH
chmod +x /tmp/mergekit-yaml
PARAMS=${PARAMS:-250M}
REPS=${REPS:-3}
if [ -n "$DRY" ]; then
  DEVICE=cpu
  PIPELINE_MODEL=(--tiny)
  ONLY=${ONLY:-env pipeline}
else
  DEVICE=cuda
  PIPELINE_MODEL=(--params 1B)
  ONLY=${ONLY:-env pipeline tests}
fi
want() { [[ " $ONLY " == *" $1 "* ]]; }
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/steps.txt"; }
# seconds a step may take: its own cap, and no more than what is left of BUDGET
limit() { local left=$(( BUDGET - ($(date +%s) - started) )); (( left < $1 )) && echo "$left" || echo "$1"; }
can_run() { (( BUDGET - ($(date +%s) - started) > 10 )) || { stamp "$1 skipped: out of time"; return 1; }; }

python3 -c "import typer.main" 2>/dev/null || stamp "WARNING: typer cannot be imported (pydantic missing? see .whl above); the CLI will fail"

if want env; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    echo "cores $(nproc)"; free -g | head -2; df -h "$WORK" | tail -1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    python3 -c "import triton; print('triton', triton.__version__)" 2>&1
  } > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
  stamp "env"
fi
if want pipeline && can_run pipeline; then
  # model generation (~7.6 GB written once to $WORK), page-cache reads, then per method one merge to
  # start up, REPS_PIPELINE timed merges, one CPU merge and the comparison
  timeout "$(limit 330)" python3 scripts/gpu_pipeline.py --device "$DEVICE" "${PIPELINE_MODEL[@]}" \
    --methods ties,task_arithmetic --reps "${REPS_PIPELINE:-2}" --workdir "$WORK" \
    --out "$OUT/pipeline.md" --json "$OUT/pipeline.json" 2>&1 | tee "$OUT/pipeline.log"
  stamp "pipeline rc=${PIPESTATUS[0]}"
fi
if want tests && can_run tests; then
  timeout "$(limit 200)" python3 -m pytest -p no:cacheprovider -m "not slow" tests/test_gpu.py tests/test_staging.py \
    tests/test_kernels.py tests/test_native.py tests/test_reference.py > "$OUT/tests.txt" 2>&1
  stamp "tests rc=$? ($(tail -1 "$OUT/tests.txt"))"
  # NaN/Inf detection on the device path (device auto = cuda here: torch checks, no C kernel)
  if can_run nonfinite; then
    timeout "$(limit 90)" python3 -m pytest -p no:cacheprovider tests/test_adversarial_io.py -k nonfinite \
      > "$OUT/tests_nonfinite.txt" 2>&1
    stamp "nonfinite tests rc=$? ($(tail -1 "$OUT/tests_nonfinite.txt"))"
  fi
fi
if want speed && can_run speed; then
  timeout "$(limit 300)" python3 scripts/bench_speed.py --device "$DEVICE" --params "$PARAMS" --reps "$REPS" --markdown \
    --mergekit /tmp/mergekit-yaml --workdir "$WORK/bench" --out "$OUT/speed_${DEVICE}_$PARAMS.md" \
    > "$OUT/speed_${DEVICE}_$PARAMS.log" 2>&1
  stamp "speed rc=$?"
fi
if want profile && can_run profile; then  # where a GPU TIES merge spends its time (after the speed run made the models)
  recipe=$(ls "$WORK"/bench/recipes/ties.yaml 2>/dev/null)
  [ -n "$recipe" ] && timeout "$(limit 60)" python3 -m cProfile -s cumtime -m mergekit_ri.cli merge "$recipe" \
    -o "$WORK/prof-out" --force --quiet --device "$DEVICE" 2>&1 | head -60 > "$OUT/profile_ties_$DEVICE.txt"
  stamp "profile"
fi
if want wudi && can_run wudi; then
  timeout "$(limit 100)" python3 scripts/bench_wudi.py --device "$DEVICE" --budget 80 --out "$OUT/bench_wudi_$DEVICE.md" \
    > "$OUT/wudi.log" 2>&1
  stamp "wudi rc=$?"
fi
if want ri && can_run ri; then
  timeout "$(limit 90)" python3 scripts/bench_ri.py --device "$DEVICE" --out "$OUT/bench_ri.md" > "$OUT/ri.log" 2>&1
  stamp "ri rc=$?"
fi
stamp "done"
