"""One rank of a data-parallel fairseq-train on CPUs, started by torchrun or srun.

fairseq's own launcher detection counts GPUs (``rank % torch.cuda.device_count()``: no GPU, no
rank), so on CPUs the recipes start this script instead of ``fairseq_cli.train``: it turns the
launcher's environment into fairseq's explicit flags -- ``--distributed-rank``,
``--distributed-world-size``, ``--distributed-init-method tcp://HOST:PORT``, gloo,
``--distributed-no-spawn``, legacy_ddp -- and runs fairseq-train with them.

    torchrun: RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT; the ranks meet in the store of
              torchrun's agents on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE), else on MASTER_PORT + 1
    srun:     SLURM_PROCID SLURM_NTASKS SLURM_LOCALID; the first host of SLURM_STEP_NODELIST
              (``scontrol show hostnames``) and FAIRSEQ_KD_MASTER_PORT (the recipe derives it
              from the job id)

    usage: python scripts/distributed_rank.py FAIRSEQ_TRAIN_ARGS...   (examples/wmt14/README.md)
"""

import os
import subprocess
import sys


def fail(message):
    sys.stderr.write(f"distributed_rank.py: error: {message}\n")
    sys.exit(2)


def first_host(nodelist):
    """The first host name of a SLURM node list (``node[01-02]``) through scontrol."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"scontrol show hostnames {nodelist} failed ({e}); run inside a SLURM allocation")
    if not hosts:
        fail(f"scontrol show hostnames {nodelist} named no host")
    return hosts[0]


def rank_flags(env):
    """fairseq's explicit distributed flags for this process, from torchrun's or srun's environment."""
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # no agent store to join: a store of our own
            port += 1
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            fail("SLURM_STEP_NODELIST is not set; run through srun inside an allocation")
        if "FAIRSEQ_KD_MASTER_PORT" not in env:
            fail("FAIRSEQ_KD_MASTER_PORT is not set (the recipe sets it from the job id)")
        host, port = first_host(nodelist), int(env["FAIRSEQ_KD_MASTER_PORT"])
    else:
        fail("neither torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT nor srun's SLURM_PROCID/SLURM_NTASKS "
             "are set: start this script with torchrun or srun")
    return ["--distributed-rank", str(rank), "--distributed-world-size", str(world),
            "--distributed-init-method", f"tcp://{host}:{port}", "--distributed-no-spawn",
            "--distributed-backend", "gloo", "--device-id", str(local)]


def train_argv(args, env):
    """fairseq-train's argv: ``args`` with this rank's flags; legacy_ddp unless ``args`` chose a DDP backend."""
    if "--distributed-world-size" in args or "--distributed-rank" in args:
        fail("pass no --distributed-world-size/--distributed-rank: the launcher's environment sets them")
    extra = [] if "--ddp-backend" in args else ["--ddp-backend", "legacy_ddp"]
    return ["fairseq-train", *args, *rank_flags(env), *extra]


def main():
    sys.argv = train_argv(sys.argv[1:], os.environ)
    from fairseq_cli.train import cli_main

    cli_main()


if __name__ == "__main__":
    main()
