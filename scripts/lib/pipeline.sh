# shellcheck shell=bash
# shellcheck disable=SC2153  # the upper-case variables are set by the recipe that sources this file
# The recipes' shared pipeline, driven by variables: a recipe (examples/multi30k/run.sh,
# examples/wmt14/run.sh) sets every variable below, sources this file and calls pipeline_run.
#
#   prepare                    slice the corpus, joint SentencePiece (or Moses + joint BPE), fairseq-preprocess
#   teacher                    fairseq-train the teacher (label-smoothed CE); skipped with TEACHER_DIR
#   translate_teacher          decode the test set, check the line count
#   decode_train_with_teacher  Seq-KD data: the teacher's beam translations of the training source
#                              (scripts/decode_teacher.sh), only for seq_kd / hybrid_gated_kd
#   build_teacher_cache        the offline teacher cache (python -m fairseq_kd.cache build, sharded),
#                              only when TEACHER_CACHE=1
#   student_NAME               one student per entry of STUDENTS
#   average_student_NAME       (STUDENT_AVERAGE > 0) average of its last STUDENT_AVERAGE interval checkpoints
#   translate_student_NAME     decode the test set
#   score                      sacreBLEU, tokenized BLEU (compound-split for En-De), optional COMET: WORK/results.md
#
# Stages know what they ran with (scripts/lib/stages.sh): a changed setting redoes that stage and
# every stage downstream of it; DRY_RUN=1 prints every command; an interrupted fairseq-train
# resumes from its checkpoint_last.pt.
#
# Variables a recipe must set (no defaults: nothing leaks in from the environment):
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
#   FP16                   1: --fp16 training when a GPU is used
# Optional (defaults in brackets):
#   SEGMENTATION [spm]     spm: joint SentencePiece (VOCAB); bpe: Moses + joint subword-nmt BPE (BPE_MERGES)
#   BPE_MERGES [40000]     BPE merge operations (fairseq's prepare-wmt14en2{de,fr}.sh)
#   TEACHER_DIR []         a fairseq model folder (model.pt or checkpoint*.pt, dict.*.txt, bpecodes): the
#                          teacher; the data are then Moses + BPE with its codes and dictionaries
#   TEACHER_PRECISION [fp32]   the KD teacher's dtype (fp16/bf16 only when asked)
#   TEST_DECODE_ARGS [""]  test decoding flags beyond beam/lenpen (empty: fairseq's length cap, 0 x src + 200)
#   TEACHER_EXTRA STUDENT_EXTRA DECODE_EXTRA [""]  extra fairseq flags of one stage (run.sh --teacher-args...)
#   LAUNCHER [single]      single | spawn (fairseq's one-node multi-GPU spawn; on CPU: NPROC processes with
#                          a tcp:// rendezvous) | torchrun (env://, multi-node) | slurm (srun, fairseq's SLURM detection)
#   NODES [1] NPROC [1]    nodes; GPUs (or CPU processes) per node
#   NODE_RANK [0] MASTER_ADDR [localhost] MASTER_PORT [29500]   torchrun rendezvous; run the recipe on every
#                          node with its NODE_RANK (node 0 runs every stage, the others train and decode)
#   UPDATE_FREQ [1]        fairseq --update-freq (the recipe computes it from the tokens per update)
#   TEACHER_CACHE [0] CACHE_ARGS [""]  1: build the offline teacher cache; students read it (--teacher-cache)
#   COMET_MODEL []         a local COMET model: the table gets a COMET column
#   SRUN_ARGS [""]         with LAUNCHER=slurm: more srun flags of every step, split as a shell would
#   TRAIN_CPUS [4] DECODE_CPUS [4]   with LAUNCHER=slurm: --cpus-per-task of the training / decoding tasks
#   DECODE_CHUNK []        teacher decoding as a work queue of chunks of at most this many sentences
#                          (empty: DECODE_SHARDS shards); CLAIM_TIMEOUT [600] s before a silent claim is taken over
#   ON_DEGENERATE [keep]   degenerate teacher translations: keep | drop (counted in the merge report)
#   NODE_TIMEOUT [1800] NODE_HEARTBEAT [30] NODE_POLL [5]   several torchrun nodes (scripts/lib/nodes.sh)
# *_ARGS values are split on whitespace (newlines too): write --adam-betas (0.9,0.98) without a space.

PIPELINE_VARS=(RECIPE REPO WORK PYTHON CORPUS DATA_ROOT SRC TGT TRAIN_LINES VALID_LINES TEST_LINES
    TEST_FROM_VALID VOCAB WORKERS TRAIN_ARGS TEACHER_ARGS STUDENT_ARGS TEACHER_UPDATES STUDENT_UPDATES
    STUDENTS STUDENT_AVERAGE AVERAGE_UPPER_BOUND TRAIN_BEAM DECODE_SHARDS DECODE_PARALLEL DECODE_ARGS
    TEST_BEAM LENPEN TEST_BATCH FP16)
ALL_STUDENTS="baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd"
# shellcheck disable=SC2034  # teacher_args / student_args are read through train()'s nameref
train_args=() teacher_args=() student_args=() decode_args=() test_decode_args=() device=() teacher_precision=()
teacher_data=() srun_args=()

# shellcheck source=settings.sh
source "$(dirname "${BASH_SOURCE[0]}")/settings.sh"
# shellcheck source=stages.sh
source "$(dirname "${BASH_SOURCE[0]}")/stages.sh"
# shellcheck source=shards.sh
source "$(dirname "${BASH_SOURCE[0]}")/shards.sh"
# shellcheck source=nodes.sh
source "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"

die() {
    echo "$RECIPE: error: $*" >&2
    exit 1
}

split_words() {  # split_words ARRAY_NAME TEXT: TEXT split on any whitespace, newlines included
    local -n into=$1
    # shellcheck disable=SC2034  # a nameref: the caller's array
    read -r -a into <<< "${2//$'\n'/ }"
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
    : "${SEGMENTATION:=spm}" "${BPE_MERGES:=40000}" "${TEACHER_DIR:=}" "${TEACHER_PRECISION:=fp32}"
    : "${TEST_DECODE_ARGS=}" "${TEACHER_EXTRA:=}" "${STUDENT_EXTRA:=}" "${DECODE_EXTRA:=}"
    : "${LAUNCHER:=single}" "${NODES:=1}" "${NPROC:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}"
    : "${MASTER_PORT:=29500}" "${UPDATE_FREQ:=1}" "${TEACHER_CACHE:=0}" "${CACHE_ARGS:=}" "${COMET_MODEL:=}"
    : "${SRUN_ARGS:=}" "${TRAIN_CPUS:=4}" "${DECODE_CPUS:=4}" "${DECODE_CHUNK:=}" "${CLAIM_TIMEOUT:=600}"
    check_settings  # every numeric setting a number, before arithmetic evaluates it
    : "${ON_DEGENERATE:=keep}"
    export FAIRSEQ_KD_MASTER_PORT=$MASTER_PORT  # scripts/distributed_rank.py under srun
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
    split_words train_args "$TRAIN_ARGS"
    split_words teacher_args "$TEACHER_ARGS $TEACHER_EXTRA"
    split_words student_args "$STUDENT_ARGS $STUDENT_EXTRA"
    split_words decode_args "$DECODE_ARGS $DECODE_EXTRA"
    split_words test_decode_args "$TEST_DECODE_ARGS"
    if (( UPDATE_FREQ > 1 )); then train_args+=(--update-freq "$UPDATE_FREQ"); fi
    device=()
    if [[ -n ${PIPELINE_CPU:-} ]]; then
        [[ $PIPELINE_CPU == 1 ]] && device=(--cpu)
    elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        device=(--cpu)
    fi
    if [[ ${device[*]} != --cpu && $FP16 == 1 ]]; then train_args+=(--fp16); fi
    teacher_precision=()
    [[ $TEACHER_PRECISION == fp32 ]] || teacher_precision=(--teacher-precision "$TEACHER_PRECISION")
    teacher_data=()
    [[ -z $TEACHER_DIR ]] || teacher_data=(--teacher-data-dir "$TEACHER_DIR")
    TEACHER_CKPT=$WORK/teacher/checkpoint_best.pt
    if [[ -n $TEACHER_DIR ]]; then
        SEGMENTATION=bpe
        teacher_checkpoint "$TEACHER_DIR"
    fi
    [[ $SEGMENTATION == spm || $SEGMENTATION == bpe ]] || die "SEGMENTATION must be spm or bpe, got $SEGMENTATION"
    STAGE_ROLE=
    if [[ $LAUNCHER == torchrun ]] && (( NODES > 1 )); then  # scripts/lib/nodes.sh: node 0 leads, the others follow
        STAGE_ROLE=lead
        if (( NODE_RANK > 0 )); then STAGE_ROLE=follow STAGE_FOLLOWER=1; fi
    fi
    split_quoted srun_args "$SRUN_ARGS" || die "SRUN_ARGS: quote its values as in a shell, got: $SRUN_ARGS"
    check_launcher
    PIPELINE_READY=1
}

# check_launcher: the launcher's tool is there, before any stage runs; a dry run is refused the same way
check_launcher() {
    case $LAUNCHER in
        single | spawn) ;;
        slurm) command -v srun >/dev/null \
            || die "LAUNCHER=slurm needs srun, which is not on PATH: run the recipe inside a SLURM allocation (sbatch or salloc) on the cluster" ;;
        torchrun) "$PYTHON" -c "import torch.distributed.run" 2>/dev/null \
            || die "LAUNCHER=torchrun needs torch.distributed.run, which $PYTHON cannot import: install torch in that environment" ;;
        *) die "LAUNCHER must be single, spawn, torchrun or slurm, got $LAUNCHER" ;;
    esac
}

teacher_checkpoint() {  # TEACHER_CKPT: the checkpoint(s) of a downloaded fairseq model folder, ':'-joined
    local dir=$1 f found=()
    [[ -d $dir ]] || die "--teacher-dir $dir not found"
    for f in "$dir"/model.pt "$dir"/model[0-9]*.pt; do [[ -f $f ]] && found+=("$f"); done
    if (( ${#found[@]} == 0 )); then
        for f in "$dir"/checkpoint_best.pt "$dir"/checkpoint*.pt; do [[ -f $f ]] && { found+=("$f"); break; }; done
    fi
    (( ${#found[@]} > 0 )) || die "$dir has no model.pt or checkpoint*.pt: pass the folder of a fairseq model (--teacher-dir)"
    [[ -f $dir/bpecodes || -f $dir/code ]] || die "$dir has no bpecodes: --teacher-dir needs the model's BPE codes"
    [[ -f $dir/dict.$SRC.txt && -f $dir/dict.$TGT.txt ]] || die "$dir has no dict.$SRC.txt and dict.$TGT.txt (--teacher-dir)"
    TEACHER_CKPT=$(IFS=:; echo "${found[*]}")
}

# ---- launcher ---------------------------------------------------------------------------------------
# fairseq_train LOG ARGS...: fairseq-train through LAUNCHER, output appended to LOG
#   single    exactly one process (--distributed-world-size 1: fairseq would otherwise spawn one per GPU)
#   spawn     fairseq's one-node spawn over NPROC GPUs; on CPUs NPROC processes with a tcp:// rendezvous
#   torchrun  NODES x NPROC ranks (env://); on CPUs scripts/distributed_rank.py turns torchrun's environment
#             into fairseq's explicit --distributed-rank/-world-size/-init-method tcp:// (gloo)
#   slurm     srun over the allocation (fairseq's SLURM detection, --distributed-port MASTER_PORT, which the
#             recipe derives from the job id), --kill-on-bad-exit; on CPUs through distributed_rank.py too
fairseq_train() {
    local log=$1 world=$((NODES * NPROC)) r
    shift
    local -a cmd=("$PYTHON" -m fairseq_cli.train "$@") pids=() rank_py=("$PYTHON" "$REPO/scripts/distributed_rank.py" "$@")
    case $LAUNCHER in
        single) run_log "$log" "${cmd[@]}" --distributed-world-size 1 ;;
        spawn)
            if [[ ${device[*]} == --cpu ]]; then  # fairseq's spawn counts GPUs: one process per rank here
                local -a rank_args
                for ((r = 0; r < NPROC; r++)); do
                    rank_args=(--distributed-world-size "$NPROC" --distributed-rank "$r" --distributed-init-method
                        "tcp://localhost:$MASTER_PORT" --distributed-no-spawn --distributed-backend gloo)
                    if [[ $DRY_RUN == 1 ]]; then
                        printf '    %s> %q 2>&1 &\n' "$(printf '%q ' "${cmd[@]}" "${rank_args[@]}")" "$log.rank$r"
                    else
                        "${cmd[@]}" "${rank_args[@]}" > "$log.rank$r" 2>&1 &
                        pids+=($!)
                    fi
                done
                [[ $DRY_RUN == 1 ]] || wait_all "$log" "${pids[@]}"
            else
                run_log "$log" "${cmd[@]}" --distributed-world-size "$NPROC"
            fi ;;
        torchrun)
            local -a torchrun=("$PYTHON" -m torch.distributed.run --nnodes "$NODES" --nproc_per_node "$NPROC"
                --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
            if [[ ${device[*]} == --cpu ]]; then
                run_log "$log" "${torchrun[@]}" "${rank_py[@]:1}"
            else
                run_log "$log" "${torchrun[@]}" -m fairseq_cli.train "$@" --distributed-world-size "$world"
            fi ;;
        slurm)
            local -a srun=(srun --nodes "$NODES" --ntasks-per-node "$NPROC" --cpus-per-task "$TRAIN_CPUS"
                --kill-on-bad-exit=1 "${srun_args[@]}")
            if [[ ${device[*]} == --cpu ]]; then
                run_log "$log" "${srun[@]}" "${rank_py[@]}"
            else
                run_log "$log" "${srun[@]}" --gpus-per-node "$NPROC" "${cmd[@]}" --distributed-world-size "$world" \
                    --distributed-port "$MASTER_PORT"
            fi ;;
        *) die "LAUNCHER must be single, spawn, torchrun or slurm, got $LAUNCHER" ;;
    esac
}

wait_all() {  # wait_all LOG PID...: wait for the rank processes; fail when one failed
    local log=$1 pid failed=0
    shift
    for pid in "$@"; do wait "$pid" || failed=1; done
    cat "$log.rank0" >> "$log"
    cat "$log.rank0"
    (( failed == 0 )) || die "a training process failed; see $log.rank*"
}

# the decode/cache shards of this node: one per GPU, or DECODE_PARALLEL CPU processes; with several
# torchrun nodes, node r takes the shards i with i % NODES == r
shard_setup() {
    local i
    SHARD_LAUNCH=local SHARD_GPUS='' SHARD_PARALLEL=$DECODE_PARALLEL
    NUM_SHARDS=$DECODE_SHARDS
    SHARD_IDS=$(seq -s ' ' 0 $((NUM_SHARDS - 1)))
    if [[ $LAUNCHER == slurm ]]; then
        SHARD_LAUNCH=slurm
    elif [[ ${device[*]} != --cpu ]]; then
        SHARD_GPUS=$(seq -s ' ' 0 $((NPROC - 1)))
    fi
    if [[ $LAUNCHER == torchrun ]] && (( NODES > 1 )); then
        SHARD_IDS=$(for ((i = NODE_RANK; i < NUM_SHARDS; i += NODES)); do printf '%s ' "$i"; done)
    fi
    # the workers of a decode queue: one per GPU of this node, or DECODE_PARALLEL CPU processes (slurm: every
    # task of the allocation)
    QUEUE_WORKERS=$([[ -n $SHARD_GPUS ]] && echo "$NPROC" || echo "$DECODE_PARALLEL")
    [[ $LAUNCHER != slurm ]] || QUEUE_WORKERS=$((NODES * NPROC))
}

# ---- stages -----------------------------------------------------------------------------------------
# stage_outputs NAME: what a stage writes, one path per line, moved aside before it is redone
# (scripts/lib/stages.sh); prepare's own steps redo from stamps of their inputs (fairseq_kd/stamps.py)
stage_outputs() {
    local name=$1 f
    case $name in
        teacher | student_*)
            echo "$WORK/$name"
            for f in "$WORK/$name".train.log* "$WORK/$name".seconds; do echo "$f"; done ;;
        average_student_*) echo "$WORK/${name#average_}/checkpoint_avg.pt" ;;
        translate_*) for f in "$WORK/${name#translate_}".*.gen "$WORK/${name#translate_}".*.hyp; do echo "$f"; done ;;
        decode_train_with_teacher) echo "$WORK/seq_kd_decode" ;;
        build_teacher_cache | teacher_cache) echo "$WORK/teacher_cache" ;;
        extra_test_*) echo "$WORK/extra/${name#extra_test_}" ;;
        score) echo "$WORK/results.md" ;;
        deployment) printf '%s\n' "$WORK/deployment" "$WORK/deployment.md" "$WORK/deployment.json" ;;
    esac
}
prepare() {
    local common=(--corpus "$CORPUS" --data-root "$DATA_ROOT" --src "$SRC" --tgt "$TGT" --out "$DATA"
        --workers "$WORKERS" ${TRAIN_LINES:+--train-lines "$TRAIN_LINES"} ${VALID_LINES:+--valid-lines "$VALID_LINES"}
        ${TEST_LINES:+--test-lines "$TEST_LINES"} ${TEST_FROM_VALID:+--test-from-valid "$TEST_FROM_VALID"})
    if [[ $DRY_RUN == 1 ]]; then  # the fingerprint: the inputs by content (a corpus edited in place redoes it)
        note "inputs $(corpus_digests "$DATA_ROOT/$CORPUS")"
        [[ -z $TEACHER_DIR ]] || note "teacher $(file_digests "$TEACHER_DIR"/*.pt "$TEACHER_DIR"/bpecodes "$TEACHER_DIR"/code "$TEACHER_DIR"/dict.*.txt)"
    fi
    if [[ $SEGMENTATION == bpe ]]; then
        local teacher=()
        [[ -z $TEACHER_DIR ]] || teacher=(--teacher-dir "$TEACHER_DIR")
        run "$PYTHON" -m fairseq_kd.prepare_bpe "${common[@]}" --merges "$BPE_MERGES" "${teacher[@]}"
    else
        run "$PYTHON" -m fairseq_kd.prepare "${common[@]}" --vocab-size "$VOCAB"
    fi
}

corpus_digests() {  # name:sha256 of the corpus files (a changed corpus redoes prepare and what follows)
    [[ -d $1 ]] || { echo none; return; }
    local -a corpus_files
    mapfile -t corpus_files < <(find "$1" -maxdepth 1 -type f \( -name 'train.*' -o -name 'valid.*' -o -name 'test.*' \) | sort)
    file_digests "${corpus_files[@]}"
}

train() {  # train NAME UPDATES MODEL_FLAGS_ARRAY_NAME [FLAGS...]
    local name=$1 updates=$2
    local -n model=$3
    shift 3
    fairseq_train "$WORK/$name.train.log$( (( NODE_RANK == 0 )) || echo ".node$NODE_RANK")" "$BIN" --save-dir "$WORK/$name" --user-dir "$USER_DIR" \
        "${train_args[@]}" "${model[@]}" "${device[@]}" --max-update "$updates" "$@"
}

train_teacher() {
    train teacher "$TEACHER_UPDATES" teacher_args --criterion label_smoothed_cross_entropy --label-smoothing 0.1
}

train_student() {  # train_student NAME
    local name=$1
    local kd=(--task distillation_translation --teacher-path "$TEACHER_CKPT" "${teacher_precision[@]}")
    if [[ -n $TEACHER_DIR ]]; then kd+=(--teacher-data-dir "$TEACHER_DIR"); fi  # its dict.*.txt
    if [[ $TEACHER_CACHE == 1 ]]; then kd+=(--teacher-cache "$WORK/teacher_cache"); fi
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
    local out=$WORK/seq_kd_decode/train_teacher.txt n queue=()
    local threads=$(( OMP_NUM_THREADS / DECODE_PARALLEL ))
    shard_setup
    n=$(lines "$DATA/raw/train.$SRC")
    # a work queue: every worker of every node claims chunks until none is left; node 0 waits for them all
    # (taking over the claims of stopped workers), merges and checks; the other nodes only decode
    local follower=$(( NODE_RANK > 0 )) gpu_tasks=1 wait_shards=0
    [[ ${device[*]} != --cpu ]] || gpu_tasks=0
    [[ $LAUNCHER != torchrun ]] || (( NODES == 1 )) || wait_shards=604800
    [[ -z $DECODE_CHUNK ]] || queue=(CHUNK_SIZE="$DECODE_CHUNK" WORKERS="$QUEUE_WORKERS" CLAIM_TIMEOUT="$CLAIM_TIMEOUT"
        WAIT_CHUNKS="$(( 1 - follower ))" WORKER_NAME="node$NODE_RANK")
    env BEAM="$TRAIN_BEAM" NUM_SHARDS="$NUM_SHARDS" SHARD_IDS="$SHARD_IDS" PARALLEL="$SHARD_PARALLEL" GPUS="$SHARD_GPUS" \
        LAUNCH="$SHARD_LAUNCH" SRUN_ARGS="$SRUN_ARGS" SHARD_NODES="$NODES" SHARD_CPUS="$DECODE_CPUS" \
        SHARD_GPU_TASKS="$gpu_tasks" "${queue[@]}" WAIT_SHARDS="$wait_shards" \
        WORK="$WORK/seq_kd_decode" PYTHON="$PYTHON" OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 )) \
        DECODE_ARGS="${device[*]} ${teacher_precision[*]} ${teacher_data[*]} ${decode_args[*]}" DRY_RUN="$DRY_RUN" \
        NO_MERGE="$follower" ON_DEGENERATE="$ON_DEGENERATE" CT2_DIR="$WORK/ct2" \
        bash "$REPO/scripts/decode_teacher.sh" "$BIN" "$TEACHER_CKPT" train_teacher
    (( NODE_RANK == 0 )) || return 0  # node 0 merges
    require_file "$out" "the teacher decoding did not finish; re-run to resume it"
    assert_lines "$out" "$n"
}

build_teacher_cache() {  # the offline teacher cache, one shard per GPU / SLURM task / CPU process
    local extra
    shard_setup
    split_words extra "$CACHE_ARGS"
    SHARD_NODES=$NODES SHARD_TASKS=$((NODES * NPROC)) SHARD_CPUS=$DECODE_CPUS \
        SHARD_GPU_TASKS=$([[ ${device[*]} == --cpu ]] && echo 0 || echo 1) \
        launch_shards "$NUM_SHARDS" "$SHARD_IDS" "$PYTHON" -m fairseq_kd.cache build --data "$BIN" \
        --path "$TEACHER_CKPT" --out-dir "$WORK/teacher_cache" "${device[@]}" "${teacher_precision[@]}" "${teacher_data[@]}" "${extra[@]}"
    if [[ $LAUNCHER == torchrun ]] && (( NODES > 1 && NODE_RANK == 0 )); then
        wait_for_shards "$WORK/teacher_cache/shard%03d-of-%03d/lprobs.idx" "$NUM_SHARDS" 604800 || die "teacher cache shards missing"
    fi
}

average_student() {  # average_student NAME: WORK/NAME/checkpoint_avg.pt
    run "$PYTHON" -m fairseq_kd.wmt average --dir "$WORK/$1" --last "$STUDENT_AVERAGE" \
        ${AVERAGE_UPPER_BOUND:+--upper-bound "$AVERAGE_UPPER_BOUND"} --output "$WORK/$1/checkpoint_avg.pt"
}

checkpoint_of() {  # the checkpoint a model is evaluated with
    if [[ $1 == teacher ]]; then
        echo "$TEACHER_CKPT"
    elif [[ $1 == student_* && $STUDENT_AVERAGE -gt 0 ]]; then
        echo "$WORK/$1/checkpoint_avg.pt"
    else
        echo "$WORK/$1/checkpoint_best.pt"
    fi
}

translate() {  # translate NAME: test set -> WORK/NAME.test.hyp (detokenized text)
    local name=$1 checkpoint n remove=(--remove-bpe sentencepiece)
    checkpoint=$(checkpoint_of "$name")
    require_file "${checkpoint%%:*}" "the $name training stage did not finish"
    n=$(lines "$DATA/raw/test.$TGT")
    [[ $SEGMENTATION == spm ]] || remove=(--remove-bpe)
    run_to "$WORK/$name.test.gen" "$PYTHON" -m fairseq_cli.generate "$BIN" --user-dir "$USER_DIR" \
        --path "$checkpoint" --gen-subset test --beam "$TEST_BEAM" --lenpen "$LENPEN" "${test_decode_args[@]}" \
        "${remove[@]}" --batch-size "$TEST_BATCH" --required-batch-size-multiple 1 "${device[@]}"
    if [[ $SEGMENTATION == spm ]]; then
        run "$PYTHON" -m fairseq_kd.scoring extract "$WORK/$name.test.gen" "$WORK/$name.test.hyp" --expect-lines "$n"
    else  # Moses-tokenized output: detokenized for sacreBLEU
        run "$PYTHON" -m fairseq_kd.scoring extract "$WORK/$name.test.gen" "$WORK/$name.test.hyp" --expect-lines "$n" \
            --detokenize "$TGT"
    fi
    assert_lines "$WORK/$name.test.hyp" "$n"
}

score() {
    local systems=(--system "teacher=$WORK/teacher.test.hyp") s extra=()
    for s in $STUDENTS; do
        systems+=(--system "student $s=$WORK/student_$s.test.hyp")
    done
    [[ $TGT == de ]] && extra+=(--compound-split)
    [[ -z $COMET_MODEL ]] || extra+=(--comet-model "$COMET_MODEL" --src "$DATA/raw/test.$SRC")
    run "$PYTHON" -m fairseq_kd.scoring table --ref "$DATA/raw/test.$TGT" --lang "$TGT" --tokenized "${extra[@]}" \
        "${systems[@]}" --markdown "$WORK/results.md"
}

pipeline_plan() {  # the stages of this run, in order, with the stages each one reads
    local s scored="translate_teacher" teacher_dep=teacher
    if [[ -n $TEACHER_DIR ]]; then
        plan prepare "" prepare
        teacher_dep=prepare
    else
        plan prepare "" prepare
        plan teacher "prepare" train_teacher
    fi
    plan translate_teacher "$teacher_dep" translate teacher
    if [[ $TEACHER_CACHE == 1 ]]; then
        plan build_teacher_cache "$teacher_dep" build_teacher_cache
    fi
    local decoded=
    for s in $STUDENTS; do
        local deps=prepare
        case $s in
            baseline) ;;
            seq_kd) deps=decode_train_with_teacher ;;
            hybrid_gated_kd) deps="$teacher_dep decode_train_with_teacher" ;;
            *) deps=$teacher_dep ;;
        esac
        [[ $TEACHER_CACHE == 1 && $s != baseline && $s != seq_kd ]] && deps+=" build_teacher_cache"
        if [[ ($s == seq_kd || $s == hybrid_gated_kd) && -z $decoded ]]; then
            plan decode_train_with_teacher "$teacher_dep" decode_train_with_teacher
            decoded=1
        fi
        plan "student_$s" "$deps" train_student "$s"
        local last="student_$s"
        if [[ $STUDENT_AVERAGE -gt 0 ]]; then
            plan "average_student_$s" "student_$s" average_student "student_$s"
            last="average_student_$s"
        fi
        plan "translate_student_$s" "$last" translate "student_$s"
        scored+=" translate_student_$s"
    done
    plan score "$scored" score
}

pipeline_run() {
    pipeline_setup
    pipeline_plan
    run_plan
    [[ $DRY_RUN == 1 ]] || echo "results: $WORK/results.md"
}

# ---- stages of examples/multi30k/study.sh (seeds, timed rows, more test sets, teacher cache) ------------

timed() {  # timed NAME CMD [ARGS...]: run CMD, write its wall seconds to WORK/NAME.seconds
    local name=$1 start
    shift
    if [[ $DRY_RUN == 1 ]]; then "$@"; return; fi
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
    n=$(lines "$ref")
    run_to "$WORK/$name.$tag.gen" "$PYTHON" -m fairseq_cli.generate "$data" --user-dir "$USER_DIR" --path "$checkpoint" \
        --gen-subset "$subset" --beam "$TEST_BEAM" --lenpen "$LENPEN" --max-len-a 1.2 --max-len-b 10 \
        --remove-bpe sentencepiece --batch-size "$TEST_BATCH" --required-batch-size-multiple 1 "${device[@]}"
    run "$PYTHON" -m fairseq_kd.scoring extract "$WORK/$name.$tag.gen" "$WORK/$name.$tag.hyp" --expect-lines "$n"
    assert_lines "$WORK/$name.$tag.hyp" "$n"
}

check_extra_test() {  # check_extra_test NAME SRC_FILE REF_FILE: both exist, one reference line per source line
    local name=$1 src_file=$2 ref_file=$3 f n_src n_ref
    for f in "$src_file" "$ref_file"; do
        [[ -f $f ]] || die "--extra-test $name: $f not found; pass NAME=SRC_FILE,REF_FILE with existing files"
    done
    n_src=$(count_lines "$src_file") n_ref=$(count_lines "$ref_file")
    (( n_src == n_ref )) || die "--extra-test $name: $ref_file has $n_ref lines but $src_file has $n_src; pass a reference with one line per source line"
}

prepare_extra_test() {  # prepare_extra_test NAME SRC_FILE REF_FILE: WORK/extra/NAME/{raw,bin} with the study's SentencePiece and dictionary
    local name=$1 src_file=$2 ref_file=$3 dir=$WORK/extra/$1
    check_extra_test "$name" "$src_file" "$ref_file"  # under --dry-run too: a real run would be refused
    if [[ $DRY_RUN == 1 ]]; then note "extra test $name: $src_file $ref_file $(cat "$src_file" "$ref_file" | cksum)"; return; fi
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
