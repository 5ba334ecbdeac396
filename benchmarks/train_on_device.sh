#!/usr/bin/env bash
# Training on a lent GPU machine within one short lease (issue 16), tested on CPU at tiny size.
#
#   OUT=/path/to/results bash benchmarks/train_on_device.sh          # the GPU machine (~9 min)
#   OUT=/tmp/tiny SIZE=tiny INSTALL=0 bash benchmarks/train_on_device.sh   # CPU check, ~1-2 min
#
# Run from the repository root. Steps, each timed in $OUT/timeline.jsonl (one JSON line per
# step: name, seconds, exit status):
#   1. install the package from this tree (no download: TensorFlow must already be on the
#      machine; without it the script says so and exits 2);
#   2. write a training set with data_prep on every core (Beam DirectRunner, multi-processing),
#      the realistic simulator (model errors, fine anatomy, B0 tilts, 1x1x2 mm voxels);
#   3. measure the training step alone (benchmarks/train_step.py: seconds per step and patch
#      pairs/s, in-memory input) -> $OUT/step_times.jsonl;
#   4. train both stages (L1 then WGAN-GP), --precision=auto (mixed_float16 on a GPU) and
#      --strategy=auto (MirroredStrategy over several GPUs), stopped by `timeout` at
#      TRAIN_SECONDS if it runs long (every epoch keeps generator_best.keras, every checkpoint
#      is resumable), then export the best generator as a SavedModel;
#   5. write $OUT/summary.json: the steps' seconds, the training throughput (steps x batch /
#      training seconds, validation included), the devices, and what was written.
# Everything the lease must bring back is under $OUT: saved_models/, run/logs (TensorBoard),
# run/best.json, step_times.jsonl, timeline.jsonl, summary.json, devices.txt. The dataset is
# written to $WORK (default: a temporary folder) and not brought back.
#
# Sizes (environment; GPU defaults, SIZE=tiny for the CPU check): BRAINS, SHAPES, PATCHES,
# PRESET, STEPS, BATCH, EPOCH, VAL_STEPS, WORKERS (data_prep processes; 0 = every core),
# TRAIN_SECONDS, TIMED_STEPS (steps the step-time benchmark times). Bad values: one `error:`
# line, exit 2.
set -uo pipefail

OUT=${OUT:?set OUT to the folder the results go to}
SIZE=${SIZE:-gpu}
INSTALL=${INSTALL:-1}
WORK=${WORK:-$(mktemp -d)}
if [[ "$SIZE" == "tiny" ]]; then
  : "${BRAINS:=2}" "${SHAPES:=1}" "${PATCHES:=8}" "${PRESET:=test_tiny}" "${STEPS:=4}"
  : "${BATCH:=2}" "${EPOCH:=2}" "${VAL_STEPS:=2}" "${WORKERS:=2}" "${TRAIN_SECONDS:=300}"
  : "${TIMED_STEPS:=1}"
  SUBJECT_SHAPE="--subject_shape=48,56,48"
  PATCH_SIZES="--input_patch=24 --output_patch=16"
elif [[ "$SIZE" == "gpu" ]]; then
  : "${BRAINS:=16}" "${SHAPES:=8}" "${PATCHES:=200}" "${PRESET:=paper}" "${STEPS:=2000}"
  : "${BATCH:=32}" "${EPOCH:=250}" "${VAL_STEPS:=16}" "${WORKERS:=0}" "${TRAIN_SECONDS:=330}"
  : "${TIMED_STEPS:=5}"
  SUBJECT_SHAPE=""
  PATCH_SIZES=""
else
  echo "error: SIZE must be gpu or tiny, got '$SIZE'" >&2
  exit 2
fi
for name in BRAINS SHAPES PATCHES STEPS BATCH EPOCH VAL_STEPS WORKERS TRAIN_SECONDS TIMED_STEPS; do
  if ! [[ "${!name}" =~ ^[0-9]+$ ]]; then
    echo "error: $name must be a whole number, got '${!name}'" >&2
    exit 2
  fi
done
mkdir -p "$OUT" "$WORK" || { echo "error: cannot create $OUT or $WORK" >&2; exit 2; }
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
TIMELINE="$OUT/timeline.jsonl"
: > "$TIMELINE"

# step NAME COMMAND...: runs it, appends {"step", "seconds", "status"} to the timeline; its
# output goes to $OUT/NAME.log.
step() {
  local name=$1 start status tenths
  shift
  echo "--- $name: $*" >&2
  start=$(date +%s%N)
  "$@" > "$OUT/$name.log" 2>&1
  status=$?
  tenths=$(( ($(date +%s%N) - start) / 100000000 ))
  printf '{"step": "%s", "seconds": %d.%d, "status": %d}\n' "$name" $((tenths / 10)) \
    $((tenths % 10)) "$status" >> "$TIMELINE"
  return $status
}

if ! python -c "import tensorflow" 2> /dev/null; then
  echo "error: TensorFlow is not installed on this machine; nothing can be downloaded here," \
       "so it must be in the machine's image (BUILD.md, 'GPU')" >&2
  exit 2
fi
if [[ "$INSTALL" == "1" ]]; then
  step install python -m pip install --no-deps --no-build-isolation -e . || {
    echo "error: installing the package failed ($OUT/install.log)" >&2; exit 1; }
fi
python - > "$OUT/devices.txt" 2>&1 <<'EOF'
import os
import tensorflow as tf
print("tensorflow", tf.__version__, "cores", os.cpu_count())
for device in tf.config.list_physical_devices():
  print(device.device_type, device.name, tf.config.experimental.get_device_details(device))
EOF
[[ "$WORKERS" == "0" ]] && WORKERS=$(nproc)

step data python -m data_prep.make_tfrecords --out_dir="$WORK/data" --overwrite \
  --synthetic_brains="$BRAINS" --synthetic_shapes="$SHAPES" --seed=20 --val_fraction=0.2 \
  --lesion_fraction=0.5 --snr=30,50,100,200 --b0_tilt_deg=0,5,10,15,20,25,30 \
  --voxel_sizes=1x1x1,1x1x2 --model_errors=realistic --model_error_fraction=0.75 \
  --detail=fine --detail_fraction=0.75 --augment --max_patches_per_subject="$PATCHES" \
  --shards=16 --val_shards=2 --direct_num_workers="$WORKERS" $SUBJECT_SHAPE $PATCH_SIZES \
  || { echo "error: data_prep failed ($OUT/data.log)" >&2; exit 1; }

PRECISION=$(python -c "from qsmgan_tf import distribute; print(distribute.resolve_precision('auto'))" \
            2> /dev/null | tail -1)
step step_times python benchmarks/train_step.py --presets="$PRESET" --precisions="$PRECISION" \
  --stages=pretrain,wgan_gp --batch="$BATCH" --steps="$TIMED_STEPS" --warmup=1 \
  || echo "warning: the step-time benchmark failed ($OUT/step_times.log)" >&2
grep '^{' "$OUT/step_times.log" > "$OUT/step_times.jsonl" || true

step train timeout --signal=INT "$TRAIN_SECONDS" python -m qsmgan_tf.train \
  --data_dir="$WORK/data" --model_dir="$OUT/run" --preset="$PRESET" --stage=both \
  --total_steps="$STEPS" --global_batch_size="$BATCH" --steps_per_epoch="$EPOCH" \
  --checkpoint_every_steps="$EPOCH" --val_steps="$VAL_STEPS" --precision=auto \
  --strategy=auto --quiet
TRAIN_STATUS=$?
if [[ ! -f "$OUT/run/generator_best.keras" ]]; then
  echo "error: training left no generator_best.keras (status $TRAIN_STATUS, $OUT/train.log)" >&2
  exit 1
fi
step export python -m qsmgan_tf.export --model_dir="$OUT/run" --which=best \
  --export_base="$OUT/saved_models" \
  || { echo "error: export failed ($OUT/export.log)" >&2; exit 1; }

python - "$OUT" "$STEPS" "$BATCH" "$TRAIN_STATUS" <<'EOF'
import json, os, pathlib, sys
out, steps, batch, status = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
timeline = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
seconds = {row["step"]: row["seconds"] for row in timeline}
best = json.loads((out / "run" / "best.json").read_text())
done = steps
if status != 0:  # stopped by the time limit: the stages' last checkpoints, a lower bound
  done = sum(max((int(p.name[5:-6]) for p in stage.glob("ckpt-*.index")), default=0)
             for stage in (out / "run" / "ckpt").glob("*"))
summary = {"seconds": seconds, "train_status": status, "steps_planned": steps,
           "steps_done_at_least": done, "global_batch_size": batch,
           "train_pairs_per_second": round(done * batch / seconds["train"], 2) if seconds.get("train") else None,
           "best": best, "devices": (out / "devices.txt").read_text().splitlines(),
           "step_times": [json.loads(l) for l in (out / "step_times.jsonl").read_text().splitlines()]
                         if (out / "step_times.jsonl").is_file() else [],
           "saved_models": sorted(str(p.relative_to(out)) for p in (out / "saved_models").glob("*"))}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps({k: summary[k] for k in ("seconds", "train_status", "steps_done_at_least",
                                          "train_pairs_per_second", "saved_models")}))
EOF
