"""Peak memory of one criterion's training steps, each in a fresh child process."""

import warnings

from bench.common import quiet_logging
from bench.steps import Setup


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def memory_child(spec):
    """Run in a fresh process: build one criterion's setup, then measure the peak of a few steps above it."""
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    setup = Setup(spec["bin"], spec["arch"], spec["teacher"], spec["max_tokens"], [spec["name"]],
                  spec.get("cache_dir"), num_batches=spec["batches"])
    name = spec["name"]
    if name in setup.skipped:
        return {"skipped": setup.skipped[name]}
    if setup.teacher() is not None:
        setup.teacher().to_like(setup.model)
    gc.collect()
    cuda = torch.cuda.is_available() and next(setup.model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            how = "VmHWM"
        except OSError:
            how = "ru_maxrss"
    for sample in setup.batches:
        setup.step(name, sample)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        how = "cuda"
    elif how == "VmHWM":
        peak = _status_kib("VmHWM") * 1024
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": max(peak - base, 1), "baseline_bytes": base, "how": how}


def _memory_job(spec, conn):
    warnings.filterwarnings("ignore")  # a new interpreter: hydra's and torch's notices once per child
    quiet_logging()
    try:
        import ctypes

        # large blocks are mapped and returned to the system on free (no dynamic threshold): the resident size
        # follows the live tensors
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    try:
        conn.send(memory_child(spec))
    except BaseException as e:  # report, do not hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def measure_memory(spec, names):
    """Peak bytes per criterion, each in a fresh child process (two at a time; each builds its own setup
    and measures above it).  The children are forked by a fork server, a new interpreter that has
    imported torch and fairseq and done nothing else: forked from this process, which has trained the
    teacher, a child would reuse memory freed here without its resident size growing."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "bench.memory", "torch", "fairseq", "fairseq.tasks", "fairseq_kd"])
    results, pending, running = {}, list(names), []
    while pending or running:
        while pending and len(running) < 2:
            name = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_job, args=(dict(spec, name=name), send))
            proc.start()
            send.close()
            running.append((name, proc, recv))
        name, proc, recv = running.pop(0)
        try:
            result = recv.recv()
        except EOFError:
            result = {"error": "the child process died"}
        proc.join()
        if "error" in result:
            raise SystemExit(f"benchmark: memory of {name}: {result['error']}")
        results[name] = result
    return results


