#!/usr/bin/env bash
# Knowledge distillation on the WMT pairs of the papers (WMT'14 En-De, En-Fr; WMT'16 En-Ro), end to end;
# de-en is En-De's data the other way round (e.g. for fairseq's published WMT'19 De-En teacher).
#
#   bash examples/wmt14/run.sh --pair en-de|en-fr|en-ro|de-en --scale cpu|full [--data-root DIR] [--work DIR]
#        [--students "LIST"] [--checksums FILE] [--rounds N] [--unlabeled FILE]
#
# Stages (scripts/lib/pipeline.sh, shared with the main job): [prepare_wmt] -> prepare -> teacher ->
# translate_teacher -> [decode_train_with_teacher] -> per student: student_NAME [-> average_student_NAME]
# -> translate_student_NAME -> score (WORK/results.md) -> [iterative rounds, scripts/iterate.sh].
# A finished stage records the settings it ran with (WORK/stages/NAME.done): a re-run skips it while
# they match, and redoes it and every stage downstream when one changed; prepare-wmt.sh and iterate.sh
# keep their own state and skip their finished steps themselves.
#
# --scale cpu   real data from --data-root (default ../shared/data), tiny models, a few hundred updates:
#               en-de opennmt_toy_en_de (WMT news domain; it has no test split: the last 1000 lines of its
#               valid set, newstest2012, are held out as the test set), en-fr multi30k_en_fr, en-ro tatoeba_en_ro.
# --scale full  the WMT corpus built by prepare-wmt.sh under --data-root (default work/corpora) and the
#               TIE-KD paper's settings: transformer_vaswani_wmt_en_de_big teacher, Transformer base
#               students (last 5 checkpoints averaged), beam 4, lenpen 0.6; the pair's preset.  GPUs needed.
# --students    any of: baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd (default: all six)
# --checksums   sha256 manifest of the WMT archives (--scale full), see examples/wmt14/README.md
# --rounds N    also run N rounds of iterative distillation on source-only text (--unlabeled FILE; at
#               --scale cpu the training source is used when it is not given)
#
# Per-pair settings: examples/wmt14/presets/PAIR.sh (dropout, update counts, early stopping, BPE merges),
# overridden by  --set NAME=VALUE  (repeatable; any variable of the preset or of the lists below).
# --teacher-args "..." --student-args "..." --decode-args "..."   extra fairseq flags of one stage
# --launcher single|spawn|torchrun|slurm  --nodes N  --gpus-per-node G   (G: CPU processes on CPU)
#               --node-rank R --master-addr HOST --master-port PORT (torchrun: run.sh on every node, one
#               shared --work; node 0 drives, the others join its trainings and decoding: README "Across
#               nodes"; slurm: the port defaults to one derived from SLURM_JOB_ID)
#               tokens per update stay at the paper's 32k for any GPU count (update-freq computed, printed);
#               single is one process on one GPU
# --segmentation spm|bpe   joint SentencePiece (default) or Moses + joint BPE (fairseq's published models)
# --teacher-dir DIR  a downloaded fairseq model folder (model.pt, dict.*.txt, bpecodes) is the teacher
# --teacher-cache    build the offline teacher cache and let the KD students read it
# --comet-model PATH a local COMET model: the table also shows COMET (pip install unbabel-comet)
# --teacher-precision fp32|fp16|bf16 [fp32]   --allow-cpu (full scale without a GPU)
# --dry-run          print every command of every stage, run nothing;  --redo "STAGE ..."  redo stages
#
# Environment overrides (quick tries, tests): TRAIN_LINES VALID_LINES TEST_LINES VOCAB TEACHER_UPDATES
# STUDENT_UPDATES TRAIN_BEAM TEST_BEAM DECODE_SHARDS; PYTHON [python]; ITERATE_SH [scripts/iterate.sh].
# --set only: DECODE_CHUNK (teacher-decoding queue chunk) CLAIM_TIMEOUT ON_DEGENERATE SRUN_ARGS TRAIN_CPUS
# DECODE_CPUS NODE_TIMEOUT NODE_HEARTBEAT NODE_POLL (scripts/lib/pipeline.sh, scripts/lib/nodes.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PAIR=
SCALE=
DATA_ROOT=
WORK=
STUDENTS=
CHECKSUMS=
ROUNDS=0
UNLABELED=
SETS=()
TEACHER_EXTRA='' STUDENT_EXTRA='' DECODE_EXTRA=''
LAUNCHER='' NODES=1 NPROC='' NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=${MASTER_PORT:-}
SEGMENTATION='' TEACHER_DIR='' TEACHER_CACHE=0 COMET_MODEL='' TEACHER_PRECISION=fp32 ALLOW_CPU=0 DRY_RUN=0
REDO=''  # read by scripts/lib/stages.sh
PYTHON=${PYTHON:-python}
ITERATE_SH=${ITERATE_SH:-$REPO/scripts/iterate.sh}
RECIPE=run.sh

die() { echo "$RECIPE: error: $*" >&2; exit 2; }
abspath() { if [[ -z $1 || $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) sed -n '2,44p' "$0"; exit 0 ;;
        --allow-cpu) ALLOW_CPU=1; shift; continue ;;
        --dry-run) DRY_RUN=1; shift; continue ;;
        --teacher-cache) TEACHER_CACHE=1; shift; continue ;;
        --pair | --scale | --data-root | --work | --students | --checksums | --rounds | --unlabeled | --set \
            | --teacher-args | --student-args | --decode-args | --launcher | --nodes | --gpus-per-node \
            | --node-rank | --master-addr | --master-port | --segmentation | --teacher-dir | --comet-model \
            | --teacher-precision | --redo)
            [ $# -ge 2 ] || die "$1 needs a value (see --help)" ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    case $1 in
        --pair) PAIR=$2 ;;
        --scale) SCALE=$2 ;;
        --data-root) DATA_ROOT=$2 ;;
        --work) WORK=$2 ;;
        --students) STUDENTS=$2 ;;
        --checksums) CHECKSUMS=$2 ;;
        --rounds) ROUNDS=$2 ;;
        --unlabeled) UNLABELED=$2 ;;
        --set) [[ $2 =~ ^[A-Z][A-Z0-9_]*= ]] || die "--set takes NAME=VALUE, got $2"; SETS+=("$2") ;;
        --teacher-args) TEACHER_EXTRA=$2 ;;
        --student-args) STUDENT_EXTRA=$2 ;;
        --decode-args) DECODE_EXTRA=$2 ;;
        --launcher) LAUNCHER=$2 ;;
        --nodes) NODES=$2 ;;
        --gpus-per-node) NPROC=$2 ;;
        --node-rank) NODE_RANK=$2 ;;
        --master-addr) MASTER_ADDR=$2 ;;
        --master-port) MASTER_PORT=$2 ;;
        --segmentation) SEGMENTATION=$2 ;;
        --teacher-dir) TEACHER_DIR=$2 ;;
        --comet-model) COMET_MODEL=$2 ;;
        --teacher-precision) TEACHER_PRECISION=$2 ;;
        --redo) export REDO=$2 ;;
    esac
    shift 2
done

# ---- required inputs ------------------------------------------------------------------------------
case $PAIR in
    en-de | en-fr | en-ro | de-en) ;;
    '') die "--pair is required: en-de, en-fr, en-ro or de-en" ;;
    *) die "--pair must be en-de, en-fr, en-ro or de-en, got $PAIR" ;;
esac
case $SCALE in
    cpu | full) ;;
    '') die "--scale is required: cpu (local real data, tiny models) or full (WMT, paper settings)" ;;
    *) die "--scale must be cpu or full, got $SCALE" ;;
esac
[[ $ROUNDS =~ ^[0-9]+$ ]] || die "--rounds must be a number of rounds, got $ROUNDS"
[[ -z $CHECKSUMS || $SCALE == full ]] || die "--checksums is for the WMT downloads of --scale full"
[[ -z $CHECKSUMS || -f $CHECKSUMS ]] || die "checksum manifest $CHECKSUMS not found (--checksums)"
[[ -z $UNLABELED || -f $UNLABELED ]] || die "source-only text $UNLABELED not found (--unlabeled)"
[[ $SCALE == cpu || $ROUNDS == 0 || -n $UNLABELED ]] \
    || die "--rounds at --scale full needs --unlabeled FILE (source-only text, e.g. WMT News Crawl)"
case ${LAUNCHER:-single} in single | spawn | torchrun | slurm) ;; *) die "--launcher must be single, spawn, torchrun or slurm, got $LAUNCHER" ;; esac
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number, got $NODES"
[[ -z $NPROC || $NPROC =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive number, got $NPROC"
[[ $NODES == 1 || $LAUNCHER == torchrun || $LAUNCHER == slurm ]] || die "--nodes $NODES needs --launcher torchrun or slurm"
case ${SEGMENTATION:-spm} in spm | bpe) ;; *) die "--segmentation must be spm or bpe, got $SEGMENTATION" ;; esac
case $TEACHER_PRECISION in fp32 | fp16 | bf16) ;; *) die "--teacher-precision must be fp32, fp16 or bf16" ;; esac
[[ -z $TEACHER_DIR || -d $TEACHER_DIR ]] || die "teacher folder $TEACHER_DIR not found (--teacher-dir)"
[[ -z $COMET_MODEL || -e $COMET_MODEL ]] || die "COMET model $COMET_MODEL not found (--comet-model)"
SRC=${PAIR%-*}
TGT=${PAIR#*-}
CORPUS_PAIR=en-$([[ $SRC == en ]] && echo "$TGT" || echo "$SRC")  # de-en reads the En-De corpus
CHECKSUMS=$(abspath "$CHECKSUMS")
UNLABELED=$(abspath "$UNLABELED")
TEACHER_DIR=$(abspath "$TEACHER_DIR")
COMET_MODEL=$(abspath "$COMET_MODEL")
PRESET=$REPO/examples/wmt14/presets/$PAIR.sh
# shellcheck source=presets/en-de.sh
source "$PRESET"
for assignment in "${SETS[@]}"; do  # --set NAME=VALUE: the preset's variables (and the recipe's below)
    name=${assignment%%=*}
    [[ -v $name ]] || [[ " TRAIN_LINES VALID_LINES TEST_LINES VOCAB TEACHER_UPDATES STUDENT_UPDATES TRAIN_BEAM TEST_BEAM DECODE_SHARDS DECODE_CHUNK CLAIM_TIMEOUT ON_DEGENERATE LENPEN TEST_BATCH FP16 TOKENS_PER_UPDATE MAX_TOKENS TEST_DECODE_ARGS DECODE_ARGS STUDENT_AVERAGE SRUN_ARGS TRAIN_CPUS DECODE_CPUS NODE_TIMEOUT NODE_HEARTBEAT NODE_POLL CACHE_ARGS " == *" $name "* ]] \
        || die "--set $name: unknown setting (see $PRESET and --help)$([[ $name != SBATCH_ARGS ]] || echo "; under SLURM every step is an srun inside the allocation: --set SRUN_ARGS=...")"
    export "${assignment?}"
    case $name in TEACHER_DROPOUT | STUDENT_DROPOUT | PATIENCE | BPE_MERGES | VALIDATE_UPDATES | CPU_* | FULL_*)
        printf -v "$name" '%s' "${assignment#*=}" ;; esac
done

# shellcheck source=../../scripts/lib/settings.sh
source "$REPO/scripts/lib/settings.sh"
check_settings  # --set, the options and the environment: numbers before any arithmetic sees them

# ---- presets ------------------------------------------------------------------------------------------
# A variable already set in the environment wins (':=' for numbers, '=' where empty means "all").
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [[ $SCALE == cpu ]]; then
    DATA_ROOT=${DATA_ROOT:-$REPO/../shared/data}
    CORPUS=$CPU_CORPUS; TEST_FROM_VALID=$CPU_TEST_FROM_VALID
    : "${TRAIN_LINES=$CPU_TRAIN_LINES}" "${VALID_LINES=$CPU_VALID_LINES}"
    : "${TEST_LINES=}" "${VOCAB:=4000}" "${TEACHER_UPDATES:=600}" "${STUDENT_UPDATES:=300}"
    : "${TRAIN_BEAM:=1}" "${TEST_BEAM:=4}" "${DECODE_SHARDS:=2}" "${MAX_TOKENS:=4096}" "${TOKENS_PER_UPDATE:=}"
    : "${DECODE_CHUNK:=5000}"
    WORKERS=1
    TRAIN_ARGS="--share-all-embeddings --optimizer adam --adam-betas (0.9,0.98)
        --lr-scheduler inverse_sqrt --warmup-updates 100 --warmup-init-lr 1e-07 --clip-norm 1.0
        --seed 1 --no-epoch-checkpoints --keep-last-epochs 1 --patience -1
        --num-workers 0 --log-interval 20"
    TEACHER_ARGS="--arch transformer --encoder-embed-dim 128 --decoder-embed-dim 128
        --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256 --encoder-layers 2 --decoder-layers 2
        --encoder-attention-heads 4 --decoder-attention-heads 4 --lr 0.002"
    STUDENT_ARGS="--arch transformer --encoder-embed-dim 64 --decoder-embed-dim 64
        --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-layers 1 --decoder-layers 1
        --encoder-attention-heads 2 --decoder-attention-heads 2 --lr 0.002"
    STUDENT_AVERAGE=${STUDENT_AVERAGE:-0}; AVERAGE_UPPER_BOUND=
    DECODE_PARALLEL=2; : "${DECODE_ARGS=--max-len-a 1.2 --max-len-b 10}"
    : "${TEST_DECODE_ARGS=--max-len-a 1.2 --max-len-b 10}"
    : "${LENPEN:=1}" "${TEST_BATCH:=128}" "${FP16:=0}"
    : "${ON_DEGENERATE:=keep}"  # such tiny models loop: "drop" would leave most sentences out
    NPROC=${NPROC:-1}
else
    DATA_ROOT=${DATA_ROOT:-$REPO/work/corpora}
    CORPUS=$FULL_CORPUS
    TEST_FROM_VALID=
    : "${TRAIN_LINES=}" "${VALID_LINES=}" "${TEST_LINES=}" "${VOCAB:=32000}"
    : "${TEACHER_UPDATES:=$FULL_TEACHER_UPDATES}" "${STUDENT_UPDATES:=$FULL_STUDENT_UPDATES}"
    : "${TRAIN_BEAM:=5}" "${TEST_BEAM:=4}" "${MAX_TOKENS:=4096}" "${TOKENS_PER_UPDATE:=32768}"
    WORKERS=$(nproc 2>/dev/null || echo 4)
    [[ $LAUNCHER != single ]] || NPROC=${NPROC:-1}  # one process on one GPU, whatever the node has
    if [[ $LAUNCHER == slurm || $DRY_RUN == 1 ]]; then
        NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}  # the GPUs are where srun runs (or nowhere: a dry run)
        (( GPUS > 0 )) || [[ $LAUNCHER == slurm ]] || echo "note: no GPU on this machine; the dry run shows the GPU commands"
        PIPELINE_CPU=0
    elif (( GPUS == 0 )); then
        (( ALLOW_CPU == 1 )) || die "--scale full needs a GPU and torch sees none (torch.cuda.device_count() is 0); use --launcher slurm from a login node, or --allow-cpu to run it on the CPU anyway (weeks)"
        NPROC=${NPROC:-1}
    else
        NPROC=${NPROC:-$GPUS}
        (( NPROC <= GPUS || NODES > 1 )) || die "--gpus-per-node $NPROC but torch sees $GPUS GPUs here"
    fi
    : "${DECODE_SHARDS:=$(( NODES * NPROC ))}"  # one teacher-cache shard per GPU
    : "${DECODE_CHUNK:=20000}"  # teacher decoding: a work queue of chunks of 20k sentences
    VALIDATE=
    [[ -z ${VALIDATE_UPDATES:-} ]] || VALIDATE="--validate-interval-updates $VALIDATE_UPDATES"
    TRAIN_ARGS="--share-all-embeddings --optimizer adam --adam-betas (0.9,0.98)
        --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07 --clip-norm 5.0
        --weight-decay 0.0 --save-interval-updates 5000
        --keep-interval-updates 5 --no-epoch-checkpoints --seed 1 --log-format simple --log-interval 100
        --patience $PATIENCE $VALIDATE"
    # the teacher's best checkpoint by valid BLEU (beam 4, lenpen 0.6; sacreBLEU 13a on the raw text)
    REMOVE=sentencepiece; [[ ${SEGMENTATION:-spm} == spm && -z $TEACHER_DIR ]] || REMOVE=subword_nmt
    TEACHER_ARGS="--arch transformer_vaswani_wmt_en_de_big --dropout $TEACHER_DROPOUT --attention-dropout 0.1
        --activation-dropout 0.1 --lr 5e-4 --eval-bleu --eval-bleu-args {\"beam\":4,\"lenpen\":0.6}
        --eval-bleu-remove-bpe $REMOVE --best-checkpoint-metric bleu --maximize-best-checkpoint-metric"
    STUDENT_ARGS="--arch transformer --dropout $STUDENT_DROPOUT --attention-dropout 0.1 --activation-dropout 0.1 --lr 7e-4"
    STUDENT_AVERAGE=${STUDENT_AVERAGE:-5}; AVERAGE_UPPER_BOUND=$STUDENT_UPDATES
    DECODE_PARALLEL=1; : "${DECODE_ARGS=--max-tokens 8000}"  # fairseq's length cap (0 x source + 200)
    : "${TEST_DECODE_ARGS=}" "${LENPEN:=0.6}" "${TEST_BATCH:=128}" "${FP16:=1}"
    : "${ON_DEGENERATE:=drop}"  # degenerate teacher translations left out of training (counted in the report)
fi
if [[ -z $MASTER_PORT ]]; then  # under SLURM a port of the job (two jobs on one node do not collide)
    MASTER_PORT=29500
    [[ $LAUNCHER != slurm || -z ${SLURM_JOB_ID:-} ]] || MASTER_PORT=$(( 15000 + SLURM_JOB_ID % 50000 ))
fi
LAUNCHER=${LAUNCHER:-$( (( NPROC > 1 )) && echo spawn || echo single)}
[[ $LAUNCHER != single || $NPROC == 1 ]] || die "--gpus-per-node $NPROC needs --launcher spawn, torchrun or slurm"
batches() {  # batches LABEL WORLD: UF and MT for the paper's tokens per update on WORLD GPUs, printed
    local world=$2
    UF=$(( (TOKENS_PER_UPDATE + world * MAX_TOKENS - 1) / (world * MAX_TOKENS) ))
    MT=$(( TOKENS_PER_UPDATE / (world * UF) ))
    echo "$1: $world GPUs x $MT tokens x update-freq $UF = $(( world * MT * UF )) (paper: $TOKENS_PER_UPDATE$( (( world * MT * UF == TOKENS_PER_UPDATE )) || echo ", rounded"))"
}
UPDATE_FREQ=1 ITERATE_BATCH=''
if [[ -n $TOKENS_PER_UPDATE ]]; then  # the paper's tokens per update on any number of GPUs
    max_tokens=$MAX_TOKENS
    if (( ROUNDS > 0 )); then  # the rounds run on node 0 with fairseq's own spawn over its GPUs (one with single)
        batches "tokens per update of the iterative rounds" "$([[ $LAUNCHER == single ]] && echo 1 || echo "$NPROC")"
        ITERATE_BATCH="--max-tokens $MT --update-freq $UF --distributed-world-size $([[ $LAUNCHER == single ]] && echo 1 || echo "$NPROC")"
    fi
    MAX_TOKENS=$max_tokens
    batches "tokens per update" $(( NODES * NPROC ))
    UPDATE_FREQ=$UF MAX_TOKENS=$MT
fi
TRAIN_ARGS="$TRAIN_ARGS --max-tokens $MAX_TOKENS"
STUDENTS=${STUDENTS:-baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd}
WORK=$(abspath "${WORK:-$REPO/work/wmt_${SRC}_${TGT}_$SCALE}")
DATA_ROOT=$(abspath "$DATA_ROOT")
if [[ $SCALE == cpu ]]; then
    [ -d "$DATA_ROOT/$CORPUS" ] || {
        echo "$RECIPE: error: $DATA_ROOT/$CORPUS not found: --scale cpu reads the local corpus $CORPUS; pass --data-root DIR (the folder holding $CORPUS/)" >&2
        exit 1
    }
fi

[[ $ROUNDS == 0 || ( ${SEGMENTATION:-spm} == spm && -z $TEACHER_DIR ) ]] \
    || die "--rounds runs on the SentencePiece data only; drop --segmentation bpe / --teacher-dir, or run scripts/iterate.sh by hand"

# shellcheck source=../../scripts/lib/pipeline.sh
source "$REPO/scripts/lib/pipeline.sh"
pipeline_setup

prepare_wmt() {  # no stage marker: prepare-wmt.sh skips its own finished steps, and verifies the
                 # archives again whenever --checksums is given
    run env PYTHON="$PYTHON" bash "$REPO/scripts/prepare-wmt.sh" --pair "$CORPUS_PAIR" --out "$DATA_ROOT/$CORPUS" \
        ${CHECKSUMS:+--checksums "$CHECKSUMS"}
}

iterate_train_args() {  # the training flags of the rounds: their own batches for the GPUs they run on
    local i out=()
    for ((i = 0; i < ${#train_args[@]}; i++)); do
        case ${train_args[i]} in
            --max-tokens | --update-freq) [[ -z $ITERATE_BATCH ]] || { i=$((i + 1)); continue; } ;;
        esac
        out+=("${train_args[i]}")
    done
    echo "${out[*]} $ITERATE_BATCH"
}

iterate() {  # iterative rounds on source-only text; iterate.sh keeps its own per-round state in WORK/iterate
    local unlabeled=${UNLABELED:-$DATA/raw/train.$SRC} spm=$DATA/spm.model valid_ref=$DATA/raw/valid.$TGT
    require_file "$TEACHER_CKPT" "the teacher stage did not finish"
    # the labels: a work queue like the teacher decoding, one worker per GPU of node 0 (or DECODE_PARALLEL CPU ones)
    local label_workers=$DECODE_PARALLEL label_gpus=''
    if [[ ${device[*]} != --cpu ]]; then label_workers=$NPROC label_gpus=$(seq -s ' ' 0 $((NPROC - 1))); fi
    echo "$ROUNDS rounds on $unlabeled ($ITERATE_SH resumes from $WORK/iterate/state)"
    # the rounds train with fairseq's own multi-GPU spawn on every visible GPU: legacy_ddp, as tie_kd needs
    run env DATA="$BIN" UNLABELED="$unlabeled" SPM_MODEL="$spm" TEACHER="$TEACHER_CKPT" \
        VALID_REF="$valid_ref" WORK="$WORK/iterate" SRC="$SRC" TGT="$TGT" ROUNDS="$ROUNDS" \
        UPDATES_PER_ROUND="$STUDENT_UPDATES" ARCH_ARGS="${student_args[*]}" \
        TRAIN_ARGS="$(iterate_train_args) --ddp-backend legacy_ddp" \
        LABEL_BEAM="$TRAIN_BEAM" VALID_BEAM="$TEST_BEAM" ON_DEGENERATE="$ON_DEGENERATE" \
        LABEL_CHUNK="$DECODE_CHUNK" LABEL_WORKERS="$label_workers" LABEL_GPUS="$label_gpus" \
        DECODE_ARGS="${decode_args[*]}" \
        CPU="$([[ ${device[*]} == --cpu ]] && echo 1 || echo 0)" PYTHON="$PYTHON" USER_DIR="$USER_DIR" \
        bash "$ITERATE_SH"
}

if [[ $SCALE == full ]]; then
    plan prepare_wmt always prepare_wmt
fi
pipeline_plan
if (( ROUNDS > 0 )); then
    plan iterate always iterate
fi
run_plan
if [[ $DRY_RUN == 0 ]]; then
    echo "results: $WORK/results.md"
    (( ROUNDS > 0 )) || echo "iterative rounds on source-only text: add --rounds N [--unlabeled FILE] (runs scripts/iterate.sh)"
fi
