# The recipes' shared pipeline, driven by variables: a recipe (examples/multi30k/run.sh,
# examples/wmt14/run.sh) sets every variable below, sources this file and calls pipeline_run.
#
#   prepare                    slice the corpus, joint SentencePiece, fairseq-preprocess (WORK/data)
#   teacher                    fairseq-train the teacher (label-smoothed CE)
#   translate_teacher          decode the test set, check the line count
#   decode_train_with_teacher  Seq-KD data: the teacher's beam translations of the training source
#                              (scripts/decode_teacher.sh), only for seq_kd / hybrid_gated_kd
#   student_NAME               one student per entry of STUDENTS
#   average_student_NAME       (STUDENT_AVERAGE > 0) average of its last STUDENT_AVERAGE interval checkpoints
#   translate_student_NAME     decode the test set
#   then the sacrebleu table of every model on the test set: WORK/results.md
#
# A finished stage is skipped on a re-run (markers in WORK/stages, see stages.sh); an
# interrupted fairseq-train resumes from its checkpoint_last.pt.
#
# Variables (no defaults here: a recipe sets each one, so nothing leaks in from the environment):
#   RECIPE                 script name used in error messages
#   REPO WORK PYTHON       checkout; work folder; python with fairseq and fairseq_kd
#   CORPUS DATA_ROOT SRC TGT   corpus folder DATA_ROOT/CORPUS with {train,valid,test}.{SRC,TGT}
#   TRAIN_LINES VALID_LINES TEST_LINES   slice sizes (empty: everything)
#   TEST_FROM_VALID        empty, or N: the corpus has no test split; its last N valid pairs are the test set
#   VOCAB WORKERS          joint SentencePiece vocabulary size; fairseq-preprocess workers
#   TRAIN_ARGS             fairseq-train flags of every model (optimizer, schedule, batches, checkpoints)
#   TEACHER_ARGS STUDENT_ARGS  architecture, learning rate, dropout... of the teacher and of the students
#   TEACHER_UPDATES STUDENT_UPDATES
#   STUDENTS               baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd (any subset)
#   STUDENT_AVERAGE        0, or N: a student is the average of its last N interval checkpoints
#   AVERAGE_UPPER_BOUND    empty, or the last update averaged (checkpoints after it are ignored)
#   TRAIN_BEAM DECODE_SHARDS DECODE_PARALLEL DECODE_ARGS   Seq-KD teacher decoding of the training set
#   TEST_BEAM LENPEN TEST_BATCH   test-set decoding
#   FP16                   1: --fp16 (and an fp16 teacher for KD) when a GPU is used
# *_ARGS values are split on whitespace (newlines too): write --adam-betas (0.9,0.98) without a space.

PIPELINE_VARS=(RECIPE REPO WORK PYTHON CORPUS DATA_ROOT SRC TGT TRAIN_LINES VALID_LINES TEST_LINES
    TEST_FROM_VALID VOCAB WORKERS TRAIN_ARGS TEACHER_ARGS STUDENT_ARGS TEACHER_UPDATES STUDENT_UPDATES
    STUDENTS STUDENT_AVERAGE AVERAGE_UPPER_BOUND TRAIN_BEAM DECODE_SHARDS DECODE_PARALLEL DECODE_ARGS
    TEST_BEAM LENPEN TEST_BATCH FP16)
ALL_STUDENTS="baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd"

# shellcheck source=stages.sh
source "$(dirname "${BASH_SOURCE[0]}")/stages.sh"

die() {
    echo "$RECIPE: error: $*" >&2
    exit 1
}

# pipeline_setup: check the variables and the python, derive paths and device flags
# (pipeline_run calls it; a recipe may call it first to run its own stages before the pipeline's)
pipeline_setup() {
    local v s
    [[ -z ${PIPELINE_READY:-} ]] || return 0
    for v in "${PIPELINE_VARS[@]}"; do
        [[ -v $v ]] || { echo "pipeline.sh: error: the recipe did not set $v (see scripts/lib/pipeline.sh)" >&2; exit 1; }
    done
    for s in $STUDENTS; do
        [[ " $ALL_STUDENTS " == *" $s "* ]] || { echo "$RECIPE: error: unknown student $s ($ALL_STUDENTS)" >&2; exit 2; }
    done
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set PYTHON"
    "$PYTHON" -c "import fairseq_kd" 2>/dev/null \
        || die "fairseq_kd is not importable; install it first: pip install torch==2.13.0 && pip install -e $REPO"
    STAGE_DIR=$WORK/stages
    DATA=$WORK/data
    BIN=$DATA/bin
    USER_DIR=$REPO/user_dir
    mkdir -p "$WORK"
    # one intra-op thread: for these small models it is several times faster than two,
    # and it does not collapse when another process shares the cores
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # split on any whitespace, newlines included (read -a alone stops at the first newline)
    read -r -a train_args <<< "${TRAIN_ARGS//$'\n'/ }"
    read -r -a teacher_args <<< "${TEACHER_ARGS//$'\n'/ }"
    read -r -a student_args <<< "${STUDENT_ARGS//$'\n'/ }"
    read -r -a decode_args <<< "${DECODE_ARGS//$'\n'/ }"
    device=()
    teacher_precision=()
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        device=(--cpu)
    elif [[ $FP16 == 1 ]]; then
        train_args+=(--fp16)
        teacher_precision=(--teacher-precision fp16)
    fi
    PIPELINE_READY=1
}

prepare() {
    "$PYTHON" -m fairseq_kd.prepare --corpus "$CORPUS" --data-root "$DATA_ROOT" --src "$SRC" --tgt "$TGT" \
        --out "$DATA" --vocab-size "$VOCAB" --workers "$WORKERS" ${TRAIN_LINES:+--train-lines "$TRAIN_LINES"} \
        ${VALID_LINES:+--valid-lines "$VALID_LINES"} ${TEST_LINES:+--test-lines "$TEST_LINES"} \
        ${TEST_FROM_VALID:+--test-from-valid "$TEST_FROM_VALID"}
}

train() {  # train NAME UPDATES MODEL_FLAGS_ARRAY_NAME [FLAGS...]
    local name=$1 updates=$2
    local -n model=$3
    shift 3
    "$PYTHON" -m fairseq_cli.train "$BIN" --save-dir "$WORK/$name" --user-dir "$USER_DIR" \
        "${train_args[@]}" "${model[@]}" "${device[@]}" --max-update "$updates" "$@" 2>&1 | tee "$WORK/$name.train.log"
}

train_teacher() {
    train teacher "$TEACHER_UPDATES" teacher_args --criterion label_smoothed_cross_entropy --label-smoothing 0.1
}

train_student() {  # train_student NAME
    local name=$1
    local kd=(--task distillation_translation --teacher-path "$WORK/teacher/checkpoint_best.pt" "${teacher_precision[@]}")
    case $name in
        baseline) set -- --task distillation_translation --criterion label_smoothed_cross_entropy --label-smoothing 0.1 ;;
        word_kd) set -- "${kd[@]}" --criterion word_kd --kd-alpha 0.5 ;;
        seq_kd) set -- --task distillation_translation --teacher-target-subset train_teacher --criterion seq_kd ;;
        tie_kd) set -- "${kd[@]}" --criterion tie_kd --kd-alpha 0.5 --tie-topk 5 --tie-iterations 3 --ddp-backend legacy_ddp ;;
        self_evolution_kd) set -- "${kd[@]}" --criterion self_evolution_kd --kd-alpha 0.5 ;;
        hybrid_gated_kd) set -- "${kd[@]}" --teacher-target-subset train_teacher --criterion hybrid_gated_kd --hybrid-sent-target offline --kd-alpha 0.5 ;;
    esac
    train "student_$name" "$STUDENT_UPDATES" student_args "$@"
}

decode_train_with_teacher() {  # Seq-KD data: the teacher's translations of the training source
    local out=$WORK/seq_kd_decode/train_teacher.txt
    local threads=$(( OMP_NUM_THREADS / DECODE_PARALLEL ))
    BEAM=$TRAIN_BEAM NUM_SHARDS=$DECODE_SHARDS PARALLEL=$DECODE_PARALLEL WORK="$WORK/seq_kd_decode" PYTHON="$PYTHON" \
        OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 )) \
        DECODE_ARGS="${device[*]} ${teacher_precision[*]} ${decode_args[*]}" \
        bash "$REPO/scripts/decode_teacher.sh" "$BIN" "$WORK/teacher/checkpoint_best.pt" train_teacher
    require_file "$out" "the teacher decoding did not finish; re-run to resume it"
    assert_lines "$out" "$(wc -l < "$DATA/raw/train.$SRC")"
}

average_student() {  # average_student NAME: WORK/NAME/checkpoint_avg.pt
    "$PYTHON" -m fairseq_kd.wmt average --dir "$WORK/$1" --last "$STUDENT_AVERAGE" \
        ${AVERAGE_UPPER_BOUND:+--upper-bound "$AVERAGE_UPPER_BOUND"} --output "$WORK/$1/checkpoint_avg.pt"
}

checkpoint_of() {  # the checkpoint a model is evaluated with
    if [[ $1 == student_* && $STUDENT_AVERAGE -gt 0 ]]; then
        echo "$WORK/$1/checkpoint_avg.pt"
    else
        echo "$WORK/$1/checkpoint_best.pt"
    fi
}

translate() {  # translate NAME: test set -> WORK/NAME.test.hyp
    local name=$1 checkpoint n
    checkpoint=$(checkpoint_of "$name")
    require_file "$checkpoint" "the $name training stage did not finish"
    n=$(wc -l < "$DATA/raw/test.$TGT")
    "$PYTHON" -m fairseq_cli.generate "$BIN" --user-dir "$USER_DIR" --path "$checkpoint" \
        --gen-subset test --beam "$TEST_BEAM" --lenpen "$LENPEN" --max-len-a 1.2 --max-len-b 10 \
        --remove-bpe sentencepiece --batch-size "$TEST_BATCH" --required-batch-size-multiple 1 \
        "${device[@]}" > "$WORK/$name.test.gen.tmp"
    mv "$WORK/$name.test.gen.tmp" "$WORK/$name.test.gen"
    "$PYTHON" -m fairseq_kd.scoring extract "$WORK/$name.test.gen" "$WORK/$name.test.hyp" --expect-lines "$n"
    assert_lines "$WORK/$name.test.hyp" "$n"
}

score() {
    local systems=(--system "teacher=$WORK/teacher.test.hyp") s
    for s in $STUDENTS; do
        systems+=(--system "student $s=$WORK/student_$s.test.hyp")
    done
    "$PYTHON" -m fairseq_kd.scoring table --ref "$DATA/raw/test.$TGT" "${systems[@]}" --markdown "$WORK/results.md"
}

pipeline_run() {
    local s
    pipeline_setup
    stage prepare prepare
    stage teacher train_teacher
    stage translate_teacher translate teacher
    for s in $STUDENTS; do
        if [[ $s == seq_kd || $s == hybrid_gated_kd ]]; then
            stage decode_train_with_teacher decode_train_with_teacher
        fi
        stage "student_$s" train_student "$s"
        if [[ $STUDENT_AVERAGE -gt 0 ]]; then
            stage "average_student_$s" average_student "student_$s"
        fi
        stage "translate_student_$s" translate "student_$s"
    done
    score
    echo "results: $WORK/results.md"
}

# ---- stages of examples/multi30k/study.sh (seeds, timed rows, more test sets, teacher cache) ------------

timed() {  # timed NAME CMD [ARGS...]: run CMD, write its wall seconds to WORK/NAME.seconds
    local name=$1 start
    shift
    start=$(date +%s)
    "$@"
    echo $(( $(date +%s) - start )) > "$WORK/$name.seconds"
}

translate_split() {  # translate_split NAME SUBSET [DATA_DIR [TAG]]: SUBSET of DATA_DIR (BIN) -> WORK/NAME.TAG.hyp
    local name=$1 subset=$2 data=${3:-$BIN} tag=${4:-$2} checkpoint n ref
    checkpoint=$(checkpoint_of "$name")
    require_file "$checkpoint" "the $name training stage did not finish"
    ref=$(dirname "$data")/raw/$subset.$TGT
    require_file "$ref" "the plain-text reference of $subset"
    n=$(wc -l < "$ref")
    "$PYTHON" -m fairseq_cli.generate "$data" --user-dir "$USER_DIR" --path "$checkpoint" \
        --gen-subset "$subset" --beam "$TEST_BEAM" --lenpen "$LENPEN" --max-len-a 1.2 --max-len-b 10 \
        --remove-bpe sentencepiece --batch-size "$TEST_BATCH" --required-batch-size-multiple 1 \
        "${device[@]}" > "$WORK/$name.$tag.gen.tmp"
    mv "$WORK/$name.$tag.gen.tmp" "$WORK/$name.$tag.gen"
    "$PYTHON" -m fairseq_kd.scoring extract "$WORK/$name.$tag.gen" "$WORK/$name.$tag.hyp" --expect-lines "$n"
}

prepare_extra_test() {  # prepare_extra_test NAME SRC_FILE REF_FILE: WORK/extra/NAME/{raw,bin} with the study's SentencePiece and dictionary
    local name=$1 src_file=$2 ref_file=$3 dir=$WORK/extra/$1
    require_file "$src_file" "--extra-test $name: the source file is missing"
    require_file "$ref_file" "--extra-test $name: the reference file is missing"
    assert_lines "$ref_file" "$(wc -l < "$src_file")"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/raw" "$dir.tmp/spm"
    cp "$src_file" "$dir.tmp/raw/test.$SRC"
    cp "$ref_file" "$dir.tmp/raw/test.$TGT"
    "$PYTHON" - "$DATA/spm.model" "$dir.tmp" "$SRC" "$TGT" <<'PY'
import sys
import sentencepiece as spm
model, out, *langs = sys.argv[1:]
sp = spm.SentencePieceProcessor(model_file=model)
for lang in langs:
    with open(f"{out}/raw/test.{lang}", encoding="utf-8") as f, open(f"{out}/spm/test.{lang}", "w", encoding="utf-8") as g:
        for line in f:
            g.write(" ".join(sp.encode(line.rstrip("\n"), out_type=str)) + "\n")
PY
    "$PYTHON" -m fairseq_cli.preprocess --source-lang "$SRC" --target-lang "$TGT" --testpref "$dir.tmp/spm/test" \
        --destdir "$dir.tmp/bin" --srcdict "$BIN/dict.$SRC.txt" --tgtdict "$BIN/dict.$TGT.txt" --workers 1
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

teacher_cache_available() {  # the offline teacher cache tool is in this checkout
    "$PYTHON" -m fairseq_kd.cache --help >/dev/null 2>&1
}

build_teacher_cache() {  # WORK/teacher_cache: the teacher's top-k over the training split
    "$PYTHON" -m fairseq_kd.cache build "$BIN" --teacher-path "$WORK/teacher/checkpoint_best.pt" \
        --subset train --out "$WORK/teacher_cache" "${device[@]}"
}
