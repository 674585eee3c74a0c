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
#   PARALLEL [1]           CPU shards decoded at the same time on this machine
#   GPUS []                GPU ids of this machine ("0 1 2 3"): one shard per GPU at a time, each with
#                          CUDA_VISIBLE_DEVICES set (PARALLEL is then the number of GPUs)
#   LAUNCH [local]         local | slurm (one `srun` step inside the allocation, see lib/shards.sh;
#                          SRUN_ARGS [] more srun flags, SHARD_NODES, SHARD_CPUS, SHARD_GPU_TASKS)
#   CHUNK_SIZE []          a work queue instead of NUM_SHARDS/SHARD_IDS: chunks of at most this many
#                          sentences, claimed by WORKERS [PARALLEL, or the number of GPUS] processes here
#                          (named WORKER_NAME.k; slurm: the tasks of the step) and by any other machine
#                          sharing WORK; resumable per chunk, a silent claim taken over after
#                          CLAIM_TIMEOUT [600] s.  WAIT_CHUNKS [1]: wait for the chunks of the others,
#                          then merge (0: decode what is left and stop, like NO_MERGE)
#   WAIT_SHARDS [0]        seconds to wait for shards decoded elsewhere (other nodes) before the
#                          merge; 0: when a shard is missing, stop (exit 0) and merge on a later run
#   NO_MERGE [0]           1: decode this machine's shards only (another machine merges)
#   DRY_RUN [0]            1: print the commands, run nothing
#   BEAM [5]  NBEST [1]    beam size; n-best kept (> 1 with SELECT=bleu: Seq-Inter)
#   SELECT [top]           top | bleu
#   ON_DEGENERATE [keep]   keep | drop | reference
#   WORK [DATA_BIN/NAME.decode]   shard files, manifest, merged text and report
#   DECODE_ARGS []         more decode flags, e.g. "--cpu --max-len-a 1.2 --max-len-b 10"
#   CT2_DIR []             with --backend ctranslate2: the folder of the conversion (done once, under a lock,
#                          by the first worker), e.g. the work folder; empty: next to the checkpoint
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

# shellcheck source=lib/shards.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/shards.sh"
read -r -a extra <<< "${DECODE_ARGS:-}"
if [[ -n ${CT2_DIR:-} && " ${extra[*]} " == *" --backend ctranslate2 "* && " ${extra[*]} " != *" --ct2-dir "* ]]; then
    extra+=(--ct2-dir "$CT2_DIR")
fi
decode=("$PYTHON" -m fairseq_kd.decoding decode --data "$DATA" --split "$SPLIT" --path "$TEACHER" --out-dir "$WORK"
    --beam "$BEAM" --nbest "$NBEST" "${extra[@]}")
if [[ -n ${CHUNK_SIZE:-} ]]; then
    read -r -a gpus <<< "${GPUS:-}"
    workers=${WORKERS:-$(( ${#gpus[@]} > 0 ? ${#gpus[@]} : PARALLEL ))}
    wait_flag=()
    if [[ ${WAIT_CHUNKS:-1} == 1 ]]; then wait_flag=(--wait); else NO_MERGE=1; fi
    SHARD_LAUNCH=${LAUNCH:-local} SHARD_GPUS=${GPUS:-} \
        launch_workers "$workers" "${decode[@]}" --chunk-size "$CHUNK_SIZE" --claim-timeout "${CLAIM_TIMEOUT:-600}" \
        "${wait_flag[@]}"
else
    SHARD_LAUNCH=${LAUNCH:-local} SHARD_GPUS=${GPUS:-} SHARD_PARALLEL=$PARALLEL \
        launch_shards "$NUM_SHARDS" "$SHARD_IDS" "${decode[@]}"
fi

if [[ ${NO_MERGE:-0} == 1 ]]; then  # another node merges
    exit 0
fi
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '    %s\n' "$PYTHON -m fairseq_kd.decoding merge --out-dir $WORK --output $WORK/$NAME.txt --select $SELECT --on-degenerate $ON_DEGENERATE ${MERGE_ARGS:-}"
    printf '    %s\n' "$PYTHON -m fairseq_kd.decoding binarize --data $DATA --split $SPLIT --input $WORK/$NAME.txt --name $NAME"
    exit 0
fi
# (a queue's workers waited for every chunk; merge checks that each example has exactly one record)
if [[ -z ${CHUNK_SIZE:-} ]] && ! wait_for_shards "$WORK/shard%03d-of-%03d.jsonl" "$NUM_SHARDS" "${WAIT_SHARDS:-0}"; then
    if [[ ${WAIT_SHARDS:-0} == 0 ]]; then
        echo "decode_teacher.sh: not every shard of $NUM_SHARDS is complete yet; merge when every shard is done" >&2
        exit 0
    fi
    echo "decode_teacher.sh: error: shards still missing after ${WAIT_SHARDS}s (see above); re-run when they are done" >&2
    exit 1
fi

# shellcheck disable=SC2086
"$PYTHON" -m fairseq_kd.decoding merge --out-dir "$WORK" --output "$WORK/$NAME.txt" \
    --select "$SELECT" --on-degenerate "$ON_DEGENERATE" ${MERGE_ARGS:-}
"$PYTHON" -m fairseq_kd.decoding binarize --data "$DATA" --split "$SPLIT" \
    --input "$WORK/$NAME.txt" --name "$NAME"
