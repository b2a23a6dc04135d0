#!/usr/bin/env bash
# LLaVA on the shapes scenes, end to end on a CPU: instruction data, a short CLIP
# run for the vision tower, the tiny LM, stage 1 (align) and stage 2 (instruct).
#
#   bash launch/llava_shapes.sh DIR
#
# Each stage is a normal workdir: DIR/clip, DIR/lm, DIR/stage1, DIR/stage2, with
# the instruction data in DIR/data. Re-running resumes (finished stages are
# no-ops). Environment: PYTHON (default python), CLIP_STEPS, LM_STEPS,
# STAGE1_STEPS, STAGE2_STEPS to shorten or lengthen the stages.
set -euo pipefail
DIR=${1:?usage: bash launch/llava_shapes.sh DIR}
PY=${PYTHON:-python}
CLIP_STEPS=${CLIP_STEPS:-300}
LM_STEPS=${LM_STEPS:-200}
STAGE1_STEPS=${STAGE1_STEPS:-200}
STAGE2_STEPS=${STAGE2_STEPS:-600}
cd "$(dirname "$0")/.."
mkdir -p "$DIR"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

stamp "instruction data -> $DIR/data"
$PY -m mmjax.data.instruct --out="$DIR/data"
stamp "CLIP (vision tower) -> $DIR/clip"
# The tower that experiments/llava_shapes.py expects: micro/8 (linear stem) at 32 px.
$PY -m mmjax.train \
    --config="experiments/clip_shapes.py:vision=micro,patch=8,image_size=32,stem=linear,steps=$CLIP_STEPS" \
    --workdir="$DIR/clip" --config.eval_every="$CLIP_STEPS" --config.checkpoint_every="$CLIP_STEPS"
stamp "LM pretraining -> $DIR/lm"
$PY -m mmjax.train --config="experiments/lm_shapes.py:data=$DIR/data,steps=$LM_STEPS" \
    --workdir="$DIR/lm"
stamp "stage 1 (projector) -> $DIR/stage1"
$PY -m mmjax.train \
    --config="experiments/llava_shapes.py:stage=1,data=$DIR/data,clip=$DIR/clip,lm=$DIR/lm,steps=$STAGE1_STEPS" \
    --workdir="$DIR/stage1"
stamp "stage 2 (instruction tuning) -> $DIR/stage2"
$PY -m mmjax.train \
    --config="experiments/llava_shapes.py:stage=2,data=$DIR/data,stage1=$DIR/stage1,steps=$STAGE2_STEPS" \
    --workdir="$DIR/stage2"
stamp "done"
$PY - "$DIR" <<'PYEOF'
import json, sys
root = sys.argv[1]
for stage in ("clip", "lm", "stage1", "stage2"):
  rows = [json.loads(l) for l in open(f"{root}/{stage}/metrics.jsonl")]
  last = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
  print(stage, json.dumps({k: round(v, 4) for k, v in sorted(last.items())}))
PYEOF
