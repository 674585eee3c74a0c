#!/usr/bin/env bash
# Sequence-level KD data (Kim & Rush, 2016): decode a binarized split with the
# teacher in shards, merge the shards in source order, binarize the result into
# the same data directory as subset NAME.  A thin wrapper over
# `python -m fairseq_kd.decoding {decode,merge,binarize}` (see docs/seq_kd.md).
#
#   usage: decode_teacher.sh DATA_BIN TEACHER[:TEACHER2...] [NAME]
#
# Then train with
#   fairseq-train DATA_BIN --user-dir user_dir --task distillation_translation \
#       --teacher-target-subset NAME --criterion seq_kd ...
#
# Environment (defaults in brackets):
#   SPLIT [train]          split of DATA_BIN to decode
#   NUM_SHARDS [1]         shards the split is cut into
#   SHARD_IDS [all]        shards decoded here (e.g. "0 1" on this machine, "2 3" on another;
#                          merge/binarize run only when every shard is complete)
#   PARALLEL [1]           shards decoded at the same time on this machine
#   BEAM [5]  NBEST [1]    beam size; n-best kept (> 1 with SELECT=bleu: Seq-Inter)
#   SELECT [top]           top | bleu
#   ON_DEGENERATE [keep]   keep | drop | reference
#   WORK [DATA_BIN/NAME.decode]   shard files, manifest, merged text and report
#   DECODE_ARGS []         more decode flags, e.g. "--cpu --max-len-a 1.2 --max-len-b 10"
#   MERGE_ARGS []          more merge flags, e.g. "--degenerate-len-a 1.5"
#   PYTHON [python]
# Re-running skips complete shards and redoes interrupted ones.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
DATA=$1
TEACHER=$2
NAME=${3:-train_teacher}
SPLIT=${SPLIT:-train}
NUM_SHARDS=${NUM_SHARDS:-1}
PARALLEL=${PARALLEL:-1}
BEAM=${BEAM:-5}
NBEST=${NBEST:-1}
SELECT=${SELECT:-top}
ON_DEGENERATE=${ON_DEGENERATE:-keep}
WORK=${WORK:-$DATA/$NAME.decode}
PYTHON=${PYTHON:-python}
SHARD_IDS=${SHARD_IDS:-$(seq 0 $((NUM_SHARDS - 1)))}

running=()
for shard in $SHARD_IDS; do
    # shellcheck disable=SC2086
    "$PYTHON" -m fairseq_kd.decoding decode --data "$DATA" --split "$SPLIT" --path "$TEACHER" \
        --out-dir "$WORK" --num-shards "$NUM_SHARDS" --shard-id "$shard" \
        --beam "$BEAM" --nbest "$NBEST" ${DECODE_ARGS:-} &
    running+=($!)
    if [ ${#running[@]} -ge "$PARALLEL" ]; then
        wait "${running[0]}"
        running=("${running[@]:1}")
    fi
done
for pid in "${running[@]}"; do
    wait "$pid"
done

for ((shard = 0; shard < NUM_SHARDS; shard++)); do
    if [ ! -f "$(printf '%s/shard%03d-of-%03d.jsonl' "$WORK" "$shard" "$NUM_SHARDS")" ]; then
        echo "decode_teacher.sh: shard $shard of $NUM_SHARDS is not complete yet; merge when every shard is done" >&2
        exit 0
    fi
done

# shellcheck disable=SC2086
"$PYTHON" -m fairseq_kd.decoding merge --out-dir "$WORK" --output "$WORK/$NAME.txt" \
    --select "$SELECT" --on-degenerate "$ON_DEGENERATE" ${MERGE_ARGS:-}
"$PYTHON" -m fairseq_kd.decoding binarize --data "$DATA" --split "$SPLIT" \
    --input "$WORK/$NAME.txt" --name "$NAME"
