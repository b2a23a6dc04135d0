#!/usr/bin/env bash
# LLaVA on the shapes scenes, end to end on a CPU: instruction data, a short CLIP
# run for the vision tower, the tiny LM, stage 1 (align) and stage 2 (instruct).
#
#   bash launch/llava_shapes.sh DIR
#
# Each stage is a normal workdir: DIR/clip, DIR/lm, DIR/stage1, DIR/stage2, with
# the instruction data in DIR/data. Re-running resumes (finished stages are
# no-ops). Environment: PYTHON (default python), CLIP_STEPS, LM_STEPS,
# STAGE1_STEPS, STAGE2_STEPS to shorten or lengthen the stages; CLIP_WORKDIR=D
# takes the vision tower from an existing run of experiments/clip_shapes.py
# instead of training one in DIR/clip; ANSWERS=restate answers the questions
# that name an object with it first (mmjax.data.instruct.scene_questions);
# EXISTENCE_TURNS (default 2) of each 4-turn conversation ask whether a colour
# is present (0: every question type equally often; mmjax.data.instruct.conversation).
set -euo pipefail
DIR=${1:?usage: bash launch/llava_shapes.sh DIR}
PY=${PYTHON:-python}
CLIP_STEPS=${CLIP_STEPS:-1200}
LM_STEPS=${LM_STEPS:-200}
STAGE1_STEPS=${STAGE1_STEPS:-200}
STAGE2_STEPS=${STAGE2_STEPS:-1200}
ANSWERS=${ANSWERS:-short}
EXISTENCE_TURNS=${EXISTENCE_TURNS:-2}
DATA_ARGS="answers=$ANSWERS,existence_turns=$EXISTENCE_TURNS"
cd "$(dirname "$0")/.."
mkdir -p "$DIR"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

stamp "instruction data -> $DIR/data"
$PY -m mmjax.data.instruct --out="$DIR/data" --answers="$ANSWERS" --existence_turns="$EXISTENCE_TURNS"
if [[ -n "${CLIP_WORKDIR:-}" ]]; then
  CLIP="$CLIP_WORKDIR"
  [[ -d "$CLIP/checkpoints" ]] || { echo "CLIP_WORKDIR=$CLIP has no checkpoints/" >&2; exit 1; }
  stamp "CLIP (vision tower) <- $CLIP"
else
  CLIP="$DIR/clip"
  stamp "CLIP (vision tower) -> $CLIP"
  # The tower that experiments/llava_shapes.py expects: clip_shapes.py's own,
  # trained on scenes of one to four objects (half of them single-object), so
  # that the tower also sees scenes it must count.
  $PY -m mmjax.train --config="experiments/clip_shapes.py:steps=$CLIP_STEPS,single=0.5" \
      --workdir="$CLIP" --config.eval_every="$CLIP_STEPS" --config.checkpoint_every="$CLIP_STEPS"
fi
stamp "LM pretraining -> $DIR/lm"
$PY -m mmjax.train --config="experiments/lm_shapes.py:data=$DIR/data,steps=$LM_STEPS,$DATA_ARGS" \
    --workdir="$DIR/lm"
stamp "stage 1 (projector) -> $DIR/stage1"
$PY -m mmjax.train \
    --config="experiments/llava_shapes.py:stage=1,data=$DIR/data,clip=$CLIP,lm=$DIR/lm,steps=$STAGE1_STEPS,$DATA_ARGS" \
    --workdir="$DIR/stage1"
stamp "stage 2 (instruction tuning) -> $DIR/stage2"
$PY -m mmjax.train \
    --config="experiments/llava_shapes.py:stage=2,data=$DIR/data,stage1=$DIR/stage1,steps=$STAGE2_STEPS,$DATA_ARGS" \
    --workdir="$DIR/stage2"
stamp "done"
$PY - "$DIR" "$CLIP" <<'PYEOF'
import json, sys
root, clip = sys.argv[1:]
for stage, workdir in (("clip", clip), ("lm", f"{root}/lm"), ("stage1", f"{root}/stage1"),
                       ("stage2", f"{root}/stage2")):
  rows = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")]
  last = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
  print(stage, json.dumps({k: round(v, 4) for k, v in sorted(last.items())}))
PYEOF
