#!/usr/bin/env bash
# The GPU figures of this trainer in one command; JSON lines, markdown and logs go to OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR [all|speed|memory|lease]
#
# speed: the timing table (steps 1-3 below). memory: the --quantize_base memory table with its 16 GB / 12 GB fit
# checks and the fp16 check (benchmarks/bench_memory.py), in full. all (default): speed, then memory as time allows.
# lease: what fits one 15-minute GPU loan (under 9.5 minutes, each step capped): the eager table at 1024², compiled
# klein-4B, then the memory table of klein-4B and Z-Image at 1024²; a capped step that runs out keeps its rows.
# It leaves 8 files in OUTDIR, what one lent-GPU call brings back.
#
# Z-Image-Turbo, FLUX.2-klein-4B and -9B (random full-size weights) at 1024², K=4, gradient checkpointing, the
# default LoRA, eager and compiled; klein-4B's edit teacher with a 512² reference; then, time allowing, 512² and the
# memory table of benchmarks/bench_memory.py if it exists. It stops at the first failing command and ends with a
# short table against the targets.
# GPU_CHECK_TINY=1 runs the same commands on the tiny CPU models (a check of this script, in minutes on a CPU).
set -euo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [all|speed|memory|lease]}
PART=${2:-all}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

# The lent GPU machine lacks diffusers and has no network: install the carried wheels first
# (/work/shared/device-wheels/README.md). Elsewhere (no .whl/ folder) the installed packages are used.
if compgen -G ".whl/*.whl" > /dev/null; then
  S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S .whl/*.whl && export PYTHONPATH=$S PYTHONUNBUFFERED=1 || exit
fi

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  MODELS=(tiny-z-image tiny-klein); KLEIN=tiny-klein; RES=64; SMALL_RES=64; REFERENCE=48; MEMORY_MODELS=(tiny-z-image)
  BUDGET_S=100000; BACKEND=aot_eager  # inductor's C++ code generation takes minutes on a CPU
else
  MODELS=(z-image klein-4b klein-9b); KLEIN=klein-4b; RES=1024; SMALL_RES=512; REFERENCE=512
  MEMORY_MODELS=(z-image klein-4b klein-9b); BUDGET_S=300; BACKEND=inductor
fi
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

BENCH=(python3 benchmarks/bench_dopsd.py --rollout_steps 4 --gradient_checkpointing --repeats 2
       --modes eager compiled --compile_backend "$BACKEND" --output "$OUT/bench.jsonl")
rm -f "$OUT/bench.jsonl"

if [ "$PART" = lease ]; then
  capped() { local seconds=$1 log=$2; shift 2; timeout "$seconds" "$@" 2>&1 | tee "$OUT/$log" || echo "(failed or stopped at its ${seconds} s cap)"; }
  capped 200 bench-eager.log "${BENCH[@]}" --models "${MODELS[@]}" --resolutions "$RES" --modes eager
  capped 150 bench-compiled.log "${BENCH[@]}" --models "$KLEIN" --resolutions "$RES" --modes compiled
  for m in "$KLEIN" "${MODELS[0]}"; do
    capped 110 "memory-$m.log" python3 benchmarks/bench_memory.py --models "$m" --resolutions "$RES" --output_dir "$OUT/memory"
  done
elif [ "$PART" != memory ]; then
  # 1. The table: every model at the training resolution, eager and compiled.
  "${BENCH[@]}" --models "${MODELS[@]}" --resolutions "$RES" --markdown "$OUT/bench-main.md" 2>&1 | tee "$OUT/bench-main.log"
  # 2. What --reference_resolution saves on klein's edit teacher.
  "${BENCH[@]}" --models "$KLEIN" --resolutions "$RES" --reference_resolutions "$REFERENCE" \
    --markdown "$OUT/bench-reference.md" 2>&1 | tee "$OUT/bench-reference.log"
  # 3. Time allowing: the smaller resolution.
  if [ "$PART" = speed ] || [ "$SECONDS" -lt "$BUDGET_S" ]; then
    "${BENCH[@]}" --models "${MODELS[@]}" --resolutions "$SMALL_RES" --markdown "$OUT/bench-small.md" 2>&1 \
      | tee "$OUT/bench-small.log"
  fi
fi
if [ "$PART" = memory ] || { [ "$PART" = all ] && [ "$SECONDS" -lt "$BUDGET_S" ]; }; then
  # 4. Peak memory per --quantize_base option at 512² and 1024², fit under 16 GB and 12 GB caps, prediction vs bf16.
  python3 benchmarks/bench_memory.py --models "${MEMORY_MODELS[@]}" --resolutions "$SMALL_RES" "$RES" \
    --output_dir "$OUT/memory" 2>&1 | tee "$OUT/memory.log"
  # 5. fp16 (cards without bf16): non-finite steps and the largest block output over 10 iterations.
  python3 benchmarks/bench_memory.py --models "${MEMORY_MODELS[@]}" --resolutions "$RES" --fp16_check 10 \
    --output_dir "$OUT/fp16" 2>&1 | tee "$OUT/fp16.log"
fi
[ -f "$OUT/bench.jsonl" ] || exit 0

python3 - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

import benchmarks.bench_dopsd as bench

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
(out / "bench.md").write_text(bench.markdown(rows))
targets = {"z-image": 2.5, "klein-4b": 1.6, "klein-9b": 3.0}  # s per iteration at 1024², K=4, checkpointing
print(f"\n{rows[0]['device']}, torch {rows[0]['torch']}: D-OPSD iteration, K=4, checkpointing")
print(f"MFU against the spec-sheet peak ({rows[0]['spec_peak_tflops'] or 'n/a'} TFLOP/s) and the measured matmul"
      f" peak ({rows[0]['matmul_peak_tflops']:.4g} TFLOP/s)")
print(f"{'model':<13}{'res':>6}{'ref':>6}{'mode':>10}{'iter s':>9}{'target':>8}{'SFT x':>7}{'MFU spec':>9}"
      f"{'MFU matmul':>11}{'GiB':>7}{'compile s':>11}")
for r in rows:
    target = targets.get(r["model"]) if r["resolution"] == 1024 else None
    mfu_spec, mfu_matmul = ("n/a" if value is None else f"{100 * value:.0f}%"
                            for value in (r["mfu_vs_spec_peak"], r["mfu_vs_matmul_peak"]))
    peak = "n/a" if r["peak_memory_GiB"] is None else r["peak_memory_GiB"]
    compile_s = r["compile_first_call_s"][0] if r.get("compile_first_call_s") else "-"
    print(f"{r['model']:<13}{r['resolution']:>6}{r['reference_resolution'] or '-':>6}{r['mode']:>10}"
          f"{r['iteration_s']:>9}{target or '-':>8}{r['ratio']:>7}{mfu_spec:>9}{mfu_matmul:>11}{peak:>7}"
          f"{compile_s:>11}")
print(f"\nfull table: {out / 'bench.md'}; rows: {out / 'bench.jsonl'}")
EOF
