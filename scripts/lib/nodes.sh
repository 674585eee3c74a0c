# shellcheck shell=bash
# Who does what across nodes (LAUNCHER=torchrun, NODES > 1: the recipe runs on every node, one shared WORK).
#
# Node 0 drives every stage.  Before a distributed stage (a training, the teacher decoding, the teacher
# cache) it announces it in WORK/nodes/RUN/step.K, and marks it WORK/nodes/RUN/step.K.end when it is done;
# at the end it writes WORK/nodes/RUN/final ("done", or "failed: stage NAME (exit N)"), waits up to
# NODE_TIMEOUT seconds for every node to have joined the run, and closes it (WORK/nodes/RUN/closed).
# While it runs it renews WORK/nodes/RUN/alive every NODE_HEARTBEAT seconds.  WORK/nodes/run names its run.
#
# A node r > 0 runs no stage on its own: it joins node 0's run (a closed run is an earlier one: it waits
# for the next), runs each announced stage's distributed part (its ranks of the training, its decode workers
# on the queue), and exits 0 when node 0 writes done, 1 with one line naming node 0's failure, or 1 when node
# 0's heartbeat is older than NODE_TIMEOUT seconds.  Restarted in the middle of a run, it rejoins at the
# step in progress (a decode queue goes on; the steps node 0 has finished are not redone).
#
#   nodes_lead           node 0, before its plan: a new run, the heartbeat, the failure trap
#   nodes_announce NAME  node 0, before a distributed stage (stage() in stages.sh calls it); nodes_step_end after
#   nodes_done           node 0, after its plan
#   nodes_follow         node r > 0, instead of the plan
# Settings: NODE_TIMEOUT [1800] NODE_HEARTBEAT [30] NODE_POLL [5] (seconds).

NODES_SHARED='^(teacher|student_.*|decode_train_with_teacher|build_teacher_cache)$'
NODES_DIR='' NODES_STEP=0 NODES_HEARTBEAT_PID=''

_nodes_write() {  # FILE TEXT: written through a temporary name
    printf '%s\n' "$2" > "$1.tmp$$"
    mv "$1.tmp$$" "$1"
}

nodes_lead() {
    local run
    run=$(date '+%Y%m%dT%H%M%S')-$$-$RANDOM
    NODES_DIR=$WORK/nodes/$run
    mkdir -p "$NODES_DIR"
    touch "$NODES_DIR/alive"
    _nodes_write "$WORK/nodes/run" "$run"
    # the heartbeat stops with this shell (even when it is killed)
    ( while kill -0 $$ 2>/dev/null && sleep "${NODE_HEARTBEAT:-30}"; do touch "$NODES_DIR/alive"; done ) >/dev/null 2>&1 &
    NODES_HEARTBEAT_PID=$!
    trap 'nodes_exit $?' EXIT
    echo "node 0 of $NODES: run $run ($WORK/nodes/run); the other nodes join its distributed stages"
}

nodes_announce() {
    [[ -n $NODES_DIR && $1 =~ $NODES_SHARED ]] || return 0
    NODES_STEP=$((NODES_STEP + 1))
    _nodes_write "$NODES_DIR/step.$NODES_STEP" "$1"
}

nodes_step_end() {
    [[ -n $NODES_DIR && $1 =~ $NODES_SHARED ]] || return 0
    touch "$NODES_DIR/step.$NODES_STEP.end"
}

nodes_exit() {  # the EXIT trap of node 0: a failure is announced, the run closed
    local status=$1
    [[ -n $NODES_DIR ]] || return 0
    if [[ ! -f $NODES_DIR/final ]]; then
        _nodes_write "$NODES_DIR/final" "failed: stage ${STAGE_CURRENT:-setup} (exit $status)"
    fi
    touch "$NODES_DIR/closed"
    kill "$NODES_HEARTBEAT_PID" 2>/dev/null || true
}

nodes_done() {
    local r missing start=$SECONDS
    [[ -n $NODES_DIR ]] || return 0
    _nodes_write "$NODES_DIR/final" "done"
    while :; do
        missing=()
        for ((r = 1; r < NODES; r++)); do [[ -f $NODES_DIR/joined.$r ]] || missing+=("$r"); done
        (( ${#missing[@]} > 0 )) || break
        if (( SECONDS - start >= ${NODE_TIMEOUT:-1800} )); then
            echo "note: node(s) ${missing[*]} never joined run $(basename "$NODES_DIR") (${NODE_TIMEOUT:-1800}s)" >&2
            break
        fi
        sleep "${NODE_POLL:-5}"
    done
}

_nodes_age() { echo $(( $(date +%s) - $(stat -c %Y "$1" 2>/dev/null || echo 0) )); }

nodes_follow() {
    local runfile=$WORK/nodes/run old='' run='' dir k=1 final start=$SECONDS timeout=${NODE_TIMEOUT:-1800}
    if [[ -f $runfile ]]; then
        run=$(< "$runfile")
        [[ ! -f $WORK/nodes/$run/closed ]] || old=$run
    fi
    echo "node $NODE_RANK of $NODES: joins node 0's distributed stages (waits up to ${timeout}s for node 0)"
    while :; do
        run=''
        [[ ! -f $runfile ]] || run=$(< "$runfile")
        [[ -z $run || $run == "$old" || -f $WORK/nodes/$run/closed ]] || break
        (( SECONDS - start < timeout )) \
            || die "node 0 started no run in ${timeout}s ($runfile): start the recipe with --node-rank 0 and the same --work"
        sleep "${NODE_POLL:-5}"
    done
    dir=$WORK/nodes/$run
    touch "$dir/joined.$NODE_RANK"
    echo "node $NODE_RANK: joined run $run"
    while [[ -f $dir/step.$k.end ]]; do k=$((k + 1)); done  # finished before this node joined (a restart)
    while :; do
        if [[ -f $dir/step.$k ]]; then
            follow_stage "$(< "$dir/step.$k")"
            k=$((k + 1))
        elif [[ -f $dir/final ]]; then
            final=$(< "$dir/final")
            [[ $final == "done" ]] || die "node 0 $final; node $NODE_RANK stops (see node 0's output)"
            echo "node $NODE_RANK: node 0 is done"
            return 0
        elif (( $(_nodes_age "$dir/alive") > timeout )); then
            die "node 0 stopped: no heartbeat for over ${timeout}s ($dir/alive) and run $run is not done; restart node 0"
        else
            sleep "${NODE_POLL:-5}"
        fi
    done
}

follow_stage() {  # follow_stage NAME: this node's part of the stage node 0 announced
    local name=$1 i n=${#STAGE_NAMES[@]} started=$SECONDS
    local -a cmd
    for ((i = 0; i < n; i++)); do
        [[ ${STAGE_NAMES[i]} == "$name" ]] || continue
        eval "cmd=(${STAGE_CMDS[i]})"
        echo "== stage $((i + 1))/$n $name (started $(date '+%H:%M:%S'), with node 0)"
        "${cmd[@]}"
        echo "== stage $((i + 1))/$n $name: this node's part done in $(hms $((SECONDS - started)))"
        return 0
    done
    die "node 0 announced stage $name, which this node's plan does not have: start every node with the same arguments"
}
