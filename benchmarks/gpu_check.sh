#!/usr/bin/env bash
# The GPU figures of this trainer in one command; JSON lines, markdown and logs go to OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR [all|speed|memory|quick]
#
# speed: Z-Image-Turbo, FLUX.2-klein-4B and -9B (random full-size weights) at 1024², K=4, gradient checkpointing,
#   the default LoRA: eager and compiled (compile seconds of the first three buckets, recompiles); a compiled run
#   that starts from a first run's saved compiler cache (what a resumed run pays); --quantize_base fp8 and
#   fp8_compute against the bf16 base (seconds, peak, prediction difference; fp8_compute needs compute capability
#   8.9+); klein-4B's edit teacher with a 512² reference; 512².
# memory: the figures "What machine do I need" still lacks, most important first, each step capped and none started
#   after MEMORY_BUDGET_S (default 840) seconds: --offload (bf16 and nf4 base at 1024²: peak, s/iteration, fits
#   under 16 / 12 / 8 GB caps); whole trainer runs per model (defaults, then the smallest settings:
#   --quantize_encoders nf4 --quantize_base nf4 --offload) with host RAM (peak RSS and anonymous) and GPU peak per
#   phase, the caching phases with and without --quantize_encoders included; fp16 (cards without bf16: non-finite
#   steps over 10 iterations); 512² per --quantize_base; klein-9B with int8.
# all (default): speed, then memory as time allows.
# quick: the most important figures in under 10 minutes of GPU time, each step capped (a capped step that runs out
#   keeps its rows): eager and compiled klein-4B, its compile from a saved cache, fp8_compute on klein-4B, then the
#   eager rows of Z-Image and klein-9B.
# It stops at the first failing command (quick goes on) and ends with a short table against the targets.
# GPU_CHECK_TINY=1 runs the same commands on the tiny CPU models (a check of this script, in minutes on a CPU).
set -euo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [all|speed|memory|quick]}
PART=${2:-all}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

# A machine without network access can bring its wheels in .whl/; without that folder the installed packages are
# used.
if compgen -G ".whl/*.whl" > /dev/null; then
  S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S .whl/*.whl && export PYTHONPATH=$S PYTHONUNBUFFERED=1 || exit
fi

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  MODELS=(tiny-z-image tiny-klein); KLEIN=tiny-klein; RES=64; SMALL_RES=64; REFERENCE=48; MEMORY_MODELS=(tiny-z-image)
  BUDGET_S=100000; BACKEND=aot_eager  # inductor's C++ code generation takes minutes on a CPU
  SMALLEST="--quantize_encoders int8 --quantize_base nf4"  # --offload needs CUDA
else
  MODELS=(z-image klein-4b klein-9b); KLEIN=klein-4b; RES=1024; SMALL_RES=512; REFERENCE=512
  MEMORY_MODELS=(z-image klein-4b klein-9b); BUDGET_S=300; BACKEND=inductor
  SMALLEST="--quantize_encoders nf4 --quantize_base nf4 --offload"
fi
MEMORY_BUDGET_S=${MEMORY_BUDGET_S:-840}
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

BENCH_ARGS=(--rollout_steps 4 --gradient_checkpointing --repeats 2 --modes eager compiled --compile_backend "$BACKEND")
BENCH=(python3 benchmarks/bench_dopsd.py "${BENCH_ARGS[@]}" --output "$OUT/bench.jsonl" --markdown "$OUT/bench.md")
rm -f "$OUT/bench.jsonl" "$OUT/bench-cache.jsonl"

# bench_dopsd.py, then the compiler's cache artifacts written to (save) or read first from (load) a file: a
# compiled run, then one from its saved cache in an empty inductor cache folder, as a resumed run starts.
WITH_CACHE='import runpy, sys, torch
mode, cache = sys.argv.pop(1), sys.argv.pop(1)
sys.argv[0] = "benchmarks/bench_dopsd.py"
if mode == "load":
    print("compiler cache artifacts loaded:", torch.compiler.load_cache_artifacts(open(cache, "rb").read()))
runpy.run_path(sys.argv[0], run_name="__main__")
saved = torch.compiler.save_cache_artifacts() if mode == "save" else None
if saved is not None:
    open(cache, "wb").write(saved[0])
    print(f"saved {len(saved[0]) / 2**20:.1f} MiB of compiler cache artifacts to {cache}")'
cached_compile() {
  local folder; folder=$(mktemp -d)
  TORCHINDUCTOR_CACHE_DIR=$folder/first python3 -c "$WITH_CACHE" save "$OUT/compile-cache.bin" "${BENCH_ARGS[@]}" \
    --output "$OUT/bench-cache.jsonl" --modes compiled "$@"
  if [ -f "$OUT/compile-cache.bin" ]; then
    TORCHINDUCTOR_CACHE_DIR=$folder/resumed python3 -c "$WITH_CACHE" load "$OUT/compile-cache.bin" \
      "${BENCH_ARGS[@]}" --output "$OUT/bench-cache.jsonl" --modes compiled "$@"
  fi
  rm -rf "$folder"
}
# fp8_compute needs fp8 tensor cores (compute capability 8.9+); elsewhere its rows are left out.
FP8=(none fp8)
if python3 -c "import sys, train_dopsd_lora as t; sys.exit(not t.has_fp8_tensor_cores())" 2>/dev/null; then
  FP8+=(fp8_compute)
fi

capped() { local seconds=$1 log=$2; shift 2; timeout "$seconds" "$@" 2>&1 | tee "$OUT/$log" || echo "(failed or stopped at its ${seconds} s cap)"; }

if [ "$PART" = quick ]; then
  capped 220 bench-klein.log "${BENCH[@]}" --models "$KLEIN" --resolutions "$RES"
  capped 150 cache.log cached_compile --models "$KLEIN" --resolutions "$RES"
  capped 90 fp8.log python3 benchmarks/bench_memory.py --models "$KLEIN" --resolutions "$RES" \
    --quantize_base "${FP8[@]}" --output_dir "$OUT/fp8"
  capped 100 bench-eager.log "${BENCH[@]}" --models "${MODELS[0]}" "${MODELS[@]:2}" --resolutions "$RES" --modes eager
elif [ "$PART" != memory ]; then
  # 1. The table: every model at the training resolution, eager and compiled.
  "${BENCH[@]}" --models "${MODELS[@]}" --resolutions "$RES" --markdown "$OUT/bench-main.md" 2>&1 | tee "$OUT/bench-main.log"
  # 2. The compile a resumed run pays with the saved compiler cache.
  cached_compile --models "${MODELS[@]}" --resolutions "$RES" 2>&1 | tee "$OUT/cache.log"
  # 3. fp8 compute against weight-only fp8 and the bf16 base: seconds, peak, prediction difference.
  python3 benchmarks/bench_memory.py --models "${MODELS[@]}" --resolutions "$RES" --quantize_base "${FP8[@]}" \
    --output_dir "$OUT/fp8" 2>&1 | tee "$OUT/fp8.log"
  # 4. What --reference_resolution saves on klein's edit teacher.
  "${BENCH[@]}" --models "$KLEIN" --resolutions "$RES" --reference_resolutions "$REFERENCE" \
    --markdown "$OUT/bench-reference.md" 2>&1 | tee "$OUT/bench-reference.log"
  # 5. Time allowing: the smaller resolution.
  if [ "$PART" = speed ] || [ "$SECONDS" -lt "$BUDGET_S" ]; then
    "${BENCH[@]}" --models "${MODELS[@]}" --resolutions "$SMALL_RES" --markdown "$OUT/bench-small.md" 2>&1 \
      | tee "$OUT/bench-small.log"
  fi
fi
if [ "$PART" = memory ] || { [ "$PART" = all ] && [ "$SECONDS" -lt "$BUDGET_S" ]; }; then
  START=$SECONDS
  # A step runs if the memory budget has time left; otherwise it is named as not measured.
  step() {
    if [ $((SECONDS - START)) -lt "$MEMORY_BUDGET_S" ]; then capped "$@"; else echo "skipped (memory budget spent): $2"; fi
  }
  MEMORY=(python3 benchmarks/bench_memory.py --repeats 1)
  # 6. --offload: peak, s/iteration and the fit under 16 / 12 / 8 GB caps, bf16 and nf4 base.
  step 420 offload.log "${MEMORY[@]}" --models "${MEMORY_MODELS[@]}" --resolutions "$RES" --quantize_base none nf4 \
    --offload --cards_gb 16 12 8 --output_dir "$OUT/offload"
  # 7. Whole runs of the trainer: host RAM and GPU peak per phase (caching with and without --quantize_encoders).
  for model in "${MEMORY_MODELS[@]}"; do
    step 300 "whole-$model.log" "${MEMORY[@]}" --models "$model" --whole_run --resolutions "$RES" \
      --run_options "" "$SMALLEST" --output_dir "$OUT/whole"
  done
  # 8. fp16 (cards without bf16): non-finite steps and the largest block output over 10 iterations.
  step 180 fp16.log "${MEMORY[@]}" --models "${MEMORY_MODELS[@]}" --resolutions "$RES" --fp16_check 10 \
    --output_dir "$OUT/fp16"
  # 9. 512²: peak per --quantize_base and the 16 / 12 / 8 GB fits (1024² is in the README).
  step 240 memory-small.log "${MEMORY[@]}" --models "${MEMORY_MODELS[@]}" --resolutions "$SMALL_RES" \
    --quantize_base none nf4 fp8 --cards_gb 16 12 8 --output_dir "$OUT/memory"
  # 10. The one --quantize_base row of the 1024² table not measured yet.
  step 120 memory-int8.log "${MEMORY[@]}" --models "${MEMORY_MODELS[@]: -1}" --resolutions "$RES" --quantize_base int8 \
    --output_dir "$OUT/memory"
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
cached = out / "bench-cache.jsonl"
if cached.exists():
    for r in map(json.loads, cached.read_text().splitlines()):
        print(f"compile s per bucket, {r['model']}: {r.get('compile_first_call_s')} (first run, then from the saved cache)")
print(f"\nfull table: {out / 'bench.md'}; rows: {out / 'bench.jsonl'}")
EOF
