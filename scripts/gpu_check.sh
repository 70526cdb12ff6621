#!/usr/bin/env bash
# GPU acceptance check (issue 18). On a machine with one CUDA device, in at most 10 minutes (each step has a
# time limit: tests 90 s, bench 240 s, synth 90 s, pipeline 180 s), into one folder:
#   1. tests/        the CUDA tests of the suite (pytest -m cuda)
#   2. bench_paper   ldae bench --preset paper --device cuda --train: inference table, training step per stage
#                    at batch 1, 2, 4, ... until out of memory, largest batch, projected paper schedule
#   3. pipeline      a small-preset pipeline (a few epochs per stage) on a synthetic cohort, with its evaluation
#                    and TensorBoard event files beside every stage's logs/metrics.csv
# and summary.json (each step's exit status and seconds, the device). Exit status 0 only when every step passed.
#
#   scripts/gpu_check.sh [OUT]                        OUT defaults to runs/gpu_check
#   LDAE_GPU_CHECK_TINY=1 scripts/gpu_check.sh OUT    the same steps at tiny sizes on the CPU (what tests run)
#
# Environment: LDAE (the ldae executable, default .venv/bin/ldae, else ldae on PATH), PYTHON (default
# .venv/bin/python, else python3), LDAE_GPU_CHECK_STEPS (default "tests bench pipeline": a subset to rerun).
set -uo pipefail

main() {  # the whole script is one function, read by bash before it runs (safe to edit while running)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-runs/gpu_check}
TINY=${LDAE_GPU_CHECK_TINY:-0}
STEPS=${LDAE_GPU_CHECK_STEPS:-"tests bench pipeline"}
if [[ -z "${LDAE:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/ldae" ]]; then LDAE="$ROOT/.venv/bin/ldae"; else LDAE=ldae; fi
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STATUS="$OUT/steps.tsv"
: > "$STATUS"

if [[ "$TINY" == 1 ]]; then
  DEVICE=cpu
  BENCH=(--preset tiny --device cpu --max-batch 2 --repeats 1 --warmup 0 --steps 1 --threads 1
         --skip gemm,unet,variants,shared,recon,voxel,decode)
  SYNTH=(--subjects 20 --shape 32 40 32 --spacing 6)
  PRESET=tiny
  EPOCHS=(--autoencoder.trainer.max_epochs 1 --diffusion.trainer.max_epochs 1
          --representation.trainer.max_epochs 1)
  for stage in autoencoder diffusion representation; do   # a few batches per epoch: the plumbing, not quality
    EPOCHS+=(--$stage.trainer.limit_train_batches 4 --$stage.trainer.limit_val_batches 2)
  done
  EVAL_STEPS=2
  LIMIT=0                                   # no time limits on the CPU
else
  DEVICE=cuda
  BENCH=(--preset paper --device cuda --train-budget 45)
  SYNTH=(--subjects 30 --shape 64 80 64 --spacing 3)
  PRESET=small
  EPOCHS=(--autoencoder.trainer.max_epochs 3 --autoencoder.loss.adversarial_warmup_epochs 1
          --diffusion.trainer.max_epochs 4 --representation.trainer.max_epochs 3)
  EVAL_STEPS=10
  LIMIT=1
fi

# run NAME SECONDS CMD...: the command's output into OUT/NAME.log, its status and time into steps.tsv
run() {
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS rc
  echo "== $name: $*" | tee "$OUT/$name.log"
  if [[ "$LIMIT" == 1 ]]; then
    timeout --kill-after=10 "$seconds" "$@" >> "$OUT/$name.log" 2>&1
  else
    "$@" >> "$OUT/$name.log" 2>&1
  fi
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STATUS"
  echo "   $name: exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
  return 0
}

if [[ "$TINY" != 1 ]]; then
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PYTHON (LDAE_GPU_CHECK_TINY=1 runs the CPU variant)" >&2
    exit 2
  fi
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

for step in $STEPS; do
  case $step in
    tests)  # the suite's CUDA tests (skipped without a device), from the files that have any
      mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" "$ROOT"/tests/test_*.py)
      run tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda "${CUDA_TESTS[@]}" ;;
    bench)
      run bench_$([[ "$TINY" == 1 ]] && echo tiny || echo paper) 240 \
        "$LDAE" bench "${BENCH[@]}" --train --no-compile --json "$OUT/bench.json" ;;
    pipeline)
      # ground-truth volumes on a 3 mm grid (within ~2 % of 1.5 mm; configs/demo.yaml does the same)
      run synth 90 "$LDAE" synth --out "$OUT/cohort" "${SYNTH[@]}" --seed 0 --quiet --grid.truth_spacing 3.0
      run pipeline 180 "$LDAE" pipeline --preset "$PRESET" --csv "$OUT/cohort/cohort.csv" --out "$OUT/run" \
        --restart "${EPOCHS[@]}" \
        --representation.trainer.check_val_every_n_epoch 1 --diffusion.validation.sample_every_n_epochs 1 \
        --diffusion.validation.ddim_steps "$EVAL_STEPS" --representation.validation.ddim_steps "$EVAL_STEPS" \
        --evaluation.reconstruction.steps "[$EVAL_STEPS]" --evaluation.reconstruction.max_scans 4 \
        --evaluation.interpolation.steps "$EVAL_STEPS" --evaluation.interpolation.max_triplets 2 \
        --evaluation.manipulation.steps "$EVAL_STEPS" --evaluation.manipulation.max_scans 1 \
        --evaluation.manipulation.alphas "[0.0, 2.0]" --evaluation.manipulation.volumetry.transform Affine \
        --evaluation.baselines.enabled false ;;
    *) echo "gpu_check: unknown step '$step' (tests, bench, pipeline)" >&2; exit 2 ;;
  esac
done

# summary.json: every step's exit status and time, the device, the TensorBoard event files per stage
"$PYTHON" - "$OUT" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path

from ldae.io import write_json

out, device = Path(sys.argv[1]), sys.argv[2]
steps = [dict(zip(("step", "exit", "seconds"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
for s in steps:
    s["exit"], s["seconds"] = int(s["exit"]), int(s["seconds"])
summary = {"device": device, "steps": steps, "passed": all(s["exit"] == 0 for s in steps)}
try:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        summary["device_name"] = torch.cuda.get_device_name(0)
except ImportError:
    pass
run = out / "run"
summary["tensorboard_event_files"] = {d.name: len(list((d / "logs").glob("events.out.tfevents.*")))
                                      for d in sorted(run.glob("*")) if (d / "logs" / "metrics.csv").is_file()}
bench = out / "bench.json"
if bench.is_file():
    train = json.loads(bench.read_text()).get("train") or {}
    summary["train"] = {stage: {"largest_batch": st["largest_batch"], "stop": st["stop"]["reason"],
                                "step_s_batch_1": next((r["s"] for r in st["batches"] if r["batch"] == 1 and r["status"] == "ok"), None)}
                        for stage, st in (train.get("stages") or {}).items()}
    summary["train_schedule_s"] = train.get("schedule_s")
write_json(out / "summary.json", summary)
print(f"gpu_check: {'passed' if summary['passed'] else 'FAILED'}; summary: {out / 'summary.json'}")
sys.exit(0 if summary["passed"] else 1)
EOF
}

main "$@"; exit $?  # one line: bash never reads past it, even if the file changed meanwhile
