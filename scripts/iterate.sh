#!/usr/bin/env bash
# Iterative distillation in rounds on source-only (unlabeled) text, with
# --task iterative_distillation (docs/iterative_distillation.md).
#
#   DATA=data-bin/wmt14_en_de UNLABELED=news.2014.en SPM_MODEL=spm.model \
#   TEACHER=teacher/checkpoint_best.pt VALID_REF=raw/valid.de \
#   WORK=work/iterate ROUNDS=3 bash scripts/iterate.sh
#
# Round 0:  data   link DATA into WORK/data and binarize UNLABELED there as split "unlabeled"
#           eval   valid BLEU of the teacher (and of INIT)
# Round r:  label  (PREFIX_SOURCE=offline) beam-search the source-only split with the
#                  labeller -- the student of round r-1 (round 1: INIT, else the teacher),
#                  or always the teacher with LABELER=teacher (decoded once, in round 1) --
#                  merge, check one label per source line, binarize as unlabeled_rR
#           train  fairseq-train on bitext + source-only text, starting from the student of
#                  round r-1 (--finetune-from-model), the KD teacher being TEACHER
#           eval   decode the valid set with the round's student, check the line count
#           table  valid BLEU of every finished round -> WORK/bleu.md (one table)
#
# Every finished stage is appended to WORK/state ("ROUND STAGE") and skipped by
# a re-run, so a killed pipeline resumes at the round and stage where it stopped;
# inside a stage, fairseq-train resumes from its checkpoint_last.pt and the
# label decoding from its finished shards.  Raise ROUNDS and re-run to add
# rounds.  The settings below (except ROUNDS, CPU, PYTHON, DECODE_MAX_TOKENS)
# are recorded in WORK/settings, with the sha256 of the input files; a re-run with
# other settings or edited inputs is refused.
#
# Every variable can be set in the environment.  *_ARGS values are split on
# whitespace (write --adam-betas '(0.9,0.98)' without a space).
set -euo pipefail

# ---- required inputs -----------------------------------------------------------
DATA=${DATA:-data-bin/wmt14_en_de}   # binarized bitext (train, valid), joint or src/tgt dictionaries
UNLABELED=${UNLABELED:-}             # source-only text, one sentence per line (raw; .gz allowed)
SPM_MODEL=${SPM_MODEL:-}             # SentencePiece model of DATA; empty: UNLABELED is already segmented
TEACHER=${TEACHER:-}                 # teacher checkpoint(s), ':'-separated for an ensemble
VALID_REF=${VALID_REF:-}             # plain-text reference of DATA's valid split
WORK=${WORK:-work/wmt14_en_de.iterate}

# ---- rounds ----------------------------------------------------------------------
SRC=${SRC:-en}
TGT=${TGT:-de}
ROUNDS=${ROUNDS:-3}
UPDATES_PER_ROUND=${UPDATES_PER_ROUND:-30000}
INIT=${INIT:-}                       # student checkpoint round 1 starts from; empty: from scratch
PREFIX_SOURCE=${PREFIX_SOURCE:-offline}  # offline (labelled per round) | teacher | student (on the fly)
LABELER=${LABELER:-student}          # offline labels by the previous round's student, or by the teacher
CRITERION=${CRITERION:-word_kd}
CRITERION_ARGS=${CRITERION_ARGS:---kd-alpha 0.5 --label-smoothing 0.1}
TASK_ARGS=${TASK_ARGS:-}             # e.g. --unlabeled-weight 0.5 --prefix-max-len-a 1.5
ARCH_ARGS=${ARCH_ARGS:---arch transformer_wmt_en_de --share-all-embeddings --dropout 0.1}
TRAIN_ARGS=${TRAIN_ARGS:---optimizer adam --adam-betas (0.9,0.98) --lr 7e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07 --clip-norm 5.0 --max-tokens 4096 --update-freq 2 --save-interval-updates 2000 --keep-interval-updates 1 --no-epoch-checkpoints --log-format simple --log-interval 100 --fp16}
CHECKPOINT=${CHECKPOINT:-checkpoint_last.pt}  # which checkpoint of a round is its student

# ---- decoding --------------------------------------------------------------------
LABEL_BEAM=${LABEL_BEAM:-5}
LABEL_SHARDS=${LABEL_SHARDS:-1}
LABEL_CHUNK=${LABEL_CHUNK:-}         # labels as a work queue of chunks of this many sentences (empty: LABEL_SHARDS)
LABEL_WORKERS=${LABEL_WORKERS:-1}    # with LABEL_CHUNK: processes claiming chunks (one per GPU of LABEL_GPUS)
LABEL_GPUS=${LABEL_GPUS:-}           # GPU ids of this machine for the label workers ("0 1 2 3")
ON_DEGENERATE=${ON_DEGENERATE:-drop}  # degenerate labels: drop (left out of training) | keep
VALID_BEAM=${VALID_BEAM:-5}
DECODE_ARGS=${DECODE_ARGS:---max-len-a 1.2 --max-len-b 10}  # labels and valid decoding
DECODE_MAX_TOKENS=${DECODE_MAX_TOKENS:-8000}
REMOVE_BPE=${REMOVE_BPE:-sentencepiece}
CPU=${CPU:-0}                        # 1: everything on the CPU
PYTHON=${PYTHON:-python}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USER_DIR=${USER_DIR:-$REPO/user_dir}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# shellcheck source=lib/shards.sh
source "$REPO/scripts/lib/shards.sh"
# shellcheck source=lib/text.sh
source "$REPO/scripts/lib/text.sh"

log() { echo "[iterate.sh $(date '+%H:%M:%S')] $*" >&2; }
die() { echo "iterate.sh: error: $*" >&2; exit 1; }
abspath() { if [[ -z $1 || $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }

# ---- required-input checks ---------------------------------------------------------
[[ -n $UNLABELED ]] || die "set UNLABELED to the source-only text (one sentence per line)"
[[ -n $TEACHER ]] || die "set TEACHER to the teacher checkpoint (several separated by ':')"
[[ -n $VALID_REF ]] || die "set VALID_REF to the plain-text reference of the valid split"
DATA=$(abspath "$DATA"); UNLABELED=$(abspath "$UNLABELED"); SPM_MODEL=$(abspath "$SPM_MODEL")
VALID_REF=$(abspath "$VALID_REF"); WORK=$(abspath "$WORK"); INIT=$(abspath "$INIT")
teachers=()
IFS=: read -r -a parts <<< "$TEACHER"
for t in "${parts[@]}"; do
    [[ -n $t ]] || continue
    [[ -f $t ]] || die "teacher checkpoint $t not found (TEACHER)"
    teachers+=("$(abspath "$t")")
done
TEACHER=$(IFS=:; echo "${teachers[*]}")
[[ -f $DATA/dict.$SRC.txt && -f $DATA/dict.$TGT.txt ]] \
    || die "$DATA/dict.$SRC.txt or dict.$TGT.txt not found: DATA must be the binarized bitext (fairseq-preprocess output); check SRC/TGT"
[[ -f $DATA/valid.$SRC-$TGT.$SRC.idx || -f $DATA/valid.$TGT-$SRC.$SRC.idx ]] \
    || die "$DATA has no binarized valid split for $SRC-$TGT"
[[ -f $UNLABELED ]] || die "source-only text $UNLABELED not found (UNLABELED)"
[[ -z $SPM_MODEL || -f $SPM_MODEL ]] || die "SentencePiece model $SPM_MODEL not found (SPM_MODEL)"
[[ -f $VALID_REF ]] || die "valid reference $VALID_REF not found (VALID_REF)"
[[ -z $INIT || -f $INIT ]] || die "initial student $INIT not found (INIT)"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
[[ $UPDATES_PER_ROUND =~ ^[1-9][0-9]*$ ]] || die "UPDATES_PER_ROUND must be a positive integer, got '$UPDATES_PER_ROUND'"
case $PREFIX_SOURCE in offline | teacher | student) ;; *) die "PREFIX_SOURCE must be offline, teacher or student, got '$PREFIX_SOURCE'" ;; esac
case $LABELER in student | teacher) ;; *) die "LABELER must be student or teacher, got '$LABELER'" ;; esac
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('fairseq') and u.find_spec('fairseq_kd')))" \
    || die "$PYTHON cannot import fairseq and fairseq_kd (set PYTHON)"

read -r -a criterion_args <<< "$CRITERION_ARGS"
read -r -a task_args <<< "$TASK_ARGS"
read -r -a arch_args <<< "$ARCH_ARGS"
read -r -a train_args <<< "$TRAIN_ARGS"
read -r -a decode_args <<< "$DECODE_ARGS"
cpu=()
if [[ $CPU == 1 ]]; then cpu=(--cpu); fi
N_VALID=$(count_lines "$VALID_REF")

# ---- settings and state ------------------------------------------------------------
SETTINGS=(DATA UNLABELED SPM_MODEL TEACHER VALID_REF SRC TGT UPDATES_PER_ROUND INIT PREFIX_SOURCE LABELER
          CRITERION CRITERION_ARGS TASK_ARGS ARCH_ARGS TRAIN_ARGS CHECKPOINT LABEL_BEAM LABEL_SHARDS LABEL_CHUNK
          ON_DEGENERATE VALID_BEAM DECODE_ARGS REMOVE_BPE)
# the input files by content too (an edited UNLABELED, teacher or corpus is a changed setting), each hash
# remembered in WORK/digests by size and modification time
INPUT_FILES=("$UNLABELED" "${teachers[@]}" "$SPM_MODEL" "$VALID_REF" "$INIT" "$DATA"/dict.*.txt
             "$DATA"/train.*.bin "$DATA"/train.*.idx "$DATA"/valid.*.bin "$DATA"/valid.*.idx)
settings() {
    local v f
    for v in "${SETTINGS[@]}"; do printf '%s=%s\n' "$v" "${!v}"; done
    for f in "${INPUT_FILES[@]}"; do
        [[ ! -f $f ]] || printf 'sha256 of %s=%s\n' "$f" "$(DIGEST_CACHE=$WORK/digests file_digests "$f" | sed 's/.*://; s/ $//')"
    done
}
mkdir -p "$WORK"
STATE=$WORK/state
if [[ -f $WORK/settings ]]; then
    changed=$(diff <(settings) "$WORK/settings" | sed -n 's/^[<>] \([^=]*\)=.*/\1/p' | sort -u | paste -sd, - | sed 's/,/, /g' || true)
    [[ -z $changed ]] || die "$WORK was started with other settings or input files ($changed); restore them (see $WORK/settings) or use a new WORK"
else
    settings > "$WORK/settings.tmp" && mv "$WORK/settings.tmp" "$WORK/settings"
    echo "# iterate.sh: one line per finished stage (ROUND STAGE)" > "$STATE"
fi
last=$(grep -v '^#' "$STATE" | tail -n 1 || true)
if [[ -n $last ]]; then log "resuming after round ${last% *} stage ${last#* }"; fi

stage_done() { grep -qx "$1 $2" "$STATE"; }
# stage ROUND NAME COMMAND...: run COMMAND unless the stage is recorded as finished
stage() {
    local r=$1 name=$2
    shift 2
    if stage_done "$r" "$name"; then
        log "round $r $name: done, skipped"
        return 0
    fi
    log "round $r $name: start"
    "$@"
    echo "$r $name" >> "$STATE"
    log "round $r $name: done"
}
assert_lines() {  # FILE EXPECTED
    local n
    n=$(count_lines "$1")
    [[ $n -eq $2 ]] || die "$1 has $n lines, expected $2"
}

# ---- rounds ----------------------------------------------------------------------------
student_of_round() { if (( $1 == 0 )); then echo "$INIT"; else echo "$WORK/round$1/student.pt"; fi; }
labeler_of_round() {  # the teacher, or the student of the previous round (round 0: INIT)
    local previous
    previous=$(student_of_round $(($1 - 1)))
    if [[ $LABELER == teacher || -z $previous ]]; then echo "$TEACHER"; else echo "$previous"; fi
}
labels_of_round() { if [[ $LABELER == teacher ]]; then echo unlabeled_r1; else echo "unlabeled_r$1"; fi; }

make_data() {
    local spm=()
    if [[ -n $SPM_MODEL ]]; then spm=(--spm-model "$SPM_MODEL"); fi
    "$PYTHON" -m fairseq_kd.unlabeled --data "$DATA" --input "$UNLABELED" --dest "$WORK/data" \
        --name unlabeled -s "$SRC" -t "$TGT" "${spm[@]}"
}

decode_valid() {  # CHECKPOINT OUTPUT_PREFIX: valid hypotheses in OUTPUT_PREFIX.hyp
    "$PYTHON" -m fairseq_cli.generate "$WORK/data" --user-dir "$USER_DIR" -s "$SRC" -t "$TGT" \
        --path "$1" --gen-subset valid --beam "$VALID_BEAM" "${decode_args[@]}" \
        --max-tokens "$DECODE_MAX_TOKENS" --required-batch-size-multiple 1 \
        --remove-bpe "$REMOVE_BPE" "${cpu[@]}" > "$2.gen.tmp"
    mv "$2.gen.tmp" "$2.gen"
    "$PYTHON" -m fairseq_kd.scoring extract "$2.gen" "$2.hyp" --expect-lines "$N_VALID"
    assert_lines "$2.hyp" "$N_VALID"
}

eval_round0() {
    mkdir -p "$WORK/round0"
    decode_valid "$TEACHER" "$WORK/round0/teacher"
    if [[ -n $INIT ]]; then decode_valid "$INIT" "$WORK/round0/init"; fi
}

label_round() {
    local r=$1 dir=$WORK/round$1 n
    if [[ $LABELER == teacher ]] && (( r > 1 )); then
        log "round $r label: LABELER=teacher, round 1's labels are reused"
        return 0
    fi
    n=$(count_lines "$WORK/data/unlabeled.spm.$SRC")
    local label=("$PYTHON" -m fairseq_kd.decoding decode --data "$WORK/data" --split unlabeled -s "$SRC" -t "$TGT"
        --path "$(labeler_of_round "$r")" --out-dir "$dir/label_shards"
        --beam "$LABEL_BEAM" "${decode_args[@]}" --max-tokens "$DECODE_MAX_TOKENS" "${cpu[@]}")
    if [[ -n $LABEL_CHUNK ]]; then  # the teacher decoding's work queue (lib/shards.sh), waited for
        SHARD_GPUS=$LABEL_GPUS WORKER_NAME=label launch_workers "$LABEL_WORKERS" "${label[@]}" \
            --chunk-size "$LABEL_CHUNK" --wait || die "a label worker failed (see above); re-run to resume"
    else
        "${label[@]}" --num-shards "$LABEL_SHARDS"
    fi
    "$PYTHON" -m fairseq_kd.decoding merge --out-dir "$dir/label_shards" --output "$dir/labels.$TGT" \
        --on-degenerate "$ON_DEGENERATE"
    assert_lines "$dir/labels.$TGT" "$n"
    "$PYTHON" -m fairseq_kd.decoding binarize --data "$WORK/data" --split unlabeled -s "$SRC" -t "$TGT" \
        --input "$dir/labels.$TGT" --name "$(labels_of_round "$r")"
}

train_round() {
    local r=$1 dir=$WORK/round$1 prev extra=()
    prev=$(student_of_round $((r - 1)))
    if [[ -n $prev ]]; then extra+=(--finetune-from-model "$prev"); fi
    if [[ $PREFIX_SOURCE == offline ]]; then extra+=(--unlabeled-target-subset "$(labels_of_round "$r")"); fi
    # iterative_distillation needs fairseq's legacy DDP on more than one GPU (fairseq spawns on every visible one)
    if [[ " ${train_args[*]} " != *" --ddp-backend "* ]]; then extra+=(--ddp-backend legacy_ddp); fi
    mkdir -p "$dir/checkpoints"
    echo "==== attempt $(date '+%F %T')" >> "$dir/train.log"
    "$PYTHON" -m fairseq_cli.train "$WORK/data" --user-dir "$USER_DIR" -s "$SRC" -t "$TGT" \
        --task iterative_distillation --unlabeled-subset unlabeled --prefix-source "$PREFIX_SOURCE" \
        "${task_args[@]}" --teacher-path "$TEACHER" --criterion "$CRITERION" "${criterion_args[@]}" \
        "${arch_args[@]}" "${train_args[@]}" --max-update "$UPDATES_PER_ROUND" \
        --save-dir "$dir/checkpoints" "${extra[@]}" "${cpu[@]}" 2>&1 | tee -a "$dir/train.log"
    [[ -f $dir/checkpoints/$CHECKPOINT ]] || die "fairseq-train wrote no $dir/checkpoints/$CHECKPOINT (CHECKPOINT)"
    cp "$dir/checkpoints/$CHECKPOINT" "$dir/student.pt.tmp"
    mv "$dir/student.pt.tmp" "$dir/student.pt"
}

write_table() {  # ROUND: every round up to ROUND
    local systems=(--system "teacher=$WORK/round0/teacher.hyp") i
    if [[ -n $INIT ]]; then systems+=(--system "init=$WORK/round0/init.hyp"); fi
    for ((i = 1; i <= $1; i++)); do systems+=(--system "round$i=$WORK/round$i/valid.hyp"); done
    "$PYTHON" -m fairseq_kd.scoring table --ref "$VALID_REF" "${systems[@]}" --markdown "$WORK/bleu.md"
}

stage 0 data make_data
stage 0 eval eval_round0
for ((r = 1; r <= ROUNDS; r++)); do
    mkdir -p "$WORK/round$r"
    if [[ $PREFIX_SOURCE == offline ]]; then stage "$r" label label_round "$r"; fi
    stage "$r" train train_round "$r"
    stage "$r" eval decode_valid "$WORK/round$r/student.pt" "$WORK/round$r/valid"
    stage "$r" table write_table "$r"
done
log "valid BLEU of every round: $WORK/bleu.md"
cat "$WORK/bleu.md"
