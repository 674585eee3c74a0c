#!/usr/bin/env python
"""Benchmark: the cost of every KD criterion next to plain training, and teacher decoding speed.

One process times, on the same real batches of Multi30k en-de (``--data-root``,
default ``../shared/data`` next to the checkout), at two vocabulary sizes
(8,000 SentencePiece pieces learnt from all 29,000 training pairs, and the same
dictionary padded with unused symbols to 32,000 entries, with a copy of the
teacher whose rows for them are zero), fairseq training steps -- the
task's ``train_step`` (forward + backward), gradient scaling, clipping, the
optimizer step and the criterion's ``reduce_metrics``, as
``Trainer.train_step`` runs them -- for ``label_smoothed_cross_entropy``
and every criterion of the project with a live teacher, and where the offline
top-k teacher cache exists in the tree (``fairseq_kd.cache``) with the cache
(``NAME_cached``), plus the teacher's forward alone and the single passes
TIE-KD and the gated hybrid need (their floors).  Timings are CPU seconds of
the process (one intra-op thread by default), medians over repetitions that
interleave the criterions.  Peak memory is measured per criterion in a fresh
child process (forked by a fork server that has imported torch and fairseq and
nothing else): on the CPU the resident high-water mark of two training steps
above the resident size after construction (the kernel's VmHWM, reset after
construction; large allocations are returned to the system on free), on a
GPU ``torch.cuda.max_memory_allocated`` above the allocation after
construction.

Then the same test sentences (1,000; ``--decode-sentences``) are translated
with beam 5 by ``fairseq-generate``, the project's fairseq backend and the
CTranslate2 backend in float32 and int8 (one teacher checkpoint for all),
timed (wall clock of the decoding loop, model loading excluded; medians over
interleaved repetitions) and scored with sacreBLEU against the references.

Usage::

    python scripts/benchmark.py --json benchmark.json      # the full run (< 10 minutes on 2 cores)
    python scripts/benchmark.py --quick --json out.json    # tiny models and data (< 2 minutes)

It prints a table of ratios to ``label_smoothed_cross_entropy``, the floors
of ``tie_kd`` and ``hybrid_gated_kd``, and by how much each target is
missed; ``--json PATH`` writes the ratios (format in :func:`summary_json`).
Students are randomly initialised for the step timings (the cost of a step
does not depend on the weights); the teacher is trained briefly
(``--teacher-updates``, every core, not timed) so that its translations -- the
hybrid's online greedy targets and the decoders' output -- have realistic
lengths.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CORPUS = "multi30k_en_de"
SRC, TGT = "en", "de"
NOMINAL_VOCABS = (8000, 32000)

#: full run: the 256-dim 3+3-layer transformer of docs/performance.md; quick: a tiny one
ARCHS = {
    "full": dict(dim=256, ffn=1024, layers=3, heads=4),
    "quick": dict(dim=64, ffn=128, layers=1, heads=2),
}

#: NAME -> criterion arguments; every KD criterion with its defaults unless named
CRITERIA = {
    "label_smoothed_cross_entropy": ["--criterion", "label_smoothed_cross_entropy"],
    "word_kd": ["--criterion", "word_kd"],
    "word_kd_rkl": ["--criterion", "word_kd", "--kd-divergence", "rkl"],
    "word_kd_skl": ["--criterion", "word_kd", "--kd-divergence", "skl"],
    "word_kd_srkl": ["--criterion", "word_kd", "--kd-divergence", "srkl"],
    "tie_kd": ["--criterion", "tie_kd", "--tie-iterations", "3"],
    "self_evolution_kd": ["--criterion", "self_evolution_kd"],
    "hybrid_gated_kd": ["--criterion", "hybrid_gated_kd", "--hybrid-sent-target", "greedy-online"],
    "selective_kd": ["--criterion", "selective_kd"],
    "seq_kd": ["--criterion", "seq_kd"],
}
#: criterions run from the offline top-k cache (NAME_cached); the rest need the live teacher
CACHED = {
    "word_kd": CRITERIA["word_kd"],
    "word_kd_rkl": CRITERIA["word_kd_rkl"],
    "word_kd_skl": CRITERIA["word_kd_skl"],
    "word_kd_srkl": CRITERIA["word_kd_srkl"],
    "self_evolution_kd": CRITERIA["self_evolution_kd"],
    "selective_kd": CRITERIA["selective_kd"],
    "hybrid_gated_kd": ["--criterion", "hybrid_gated_kd", "--hybrid-sent-target", "offline"],
}
PLAIN = "label_smoothed_cross_entropy"
TEACHER_TARGET_SUBSET = "train_bench_teacher"
CACHE_K = 8


def log(msg):
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env(threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def quiet_logging():
    """fairseq's warnings only, on stderr (its command-line modules configure INFO logging to stdout)."""
    import logging

    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    root.setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("fairseq", "fairseq_cli", "fairseq_kd")):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(cmd, threads, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads), cwd=REPO, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# ---- data: one binarized Multi30k per vocabulary size ----------------------------------------------------------------


def finished_info(out):
    """The info of the data folder ``out`` finished by an earlier run, or None after emptying it."""
    info_path = os.path.join(out, "info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            return json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    return None


def write_info(out, info):
    """``out``'s info.json, written last (under a temporary name, then renamed): it marks the folder finished."""
    info_path = os.path.join(out, "info.json")
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(info_path + ".tmp", info_path)
    return info


def pad_vocab(base, work, nominal):
    """The data of ``base`` (:func:`prepare_vocab`) with its dictionary padded by unused symbols up to
    ``nominal`` entries: the same text and token ids, an output layer and ``[tokens, V]`` tensors of a
    ``nominal``-entry vocabulary."""
    from fairseq.data import Dictionary

    out = os.path.join(work, f"v{nominal}")
    info = finished_info(out)
    if info is not None:
        return info
    bin_dir = os.path.join(out, "bin")
    shutil.copytree(base["bin"], bin_dir)
    d = Dictionary.load(os.path.join(bin_dir, f"dict.{SRC}.txt"))
    padding = 0
    while len(d) < nominal:
        d.add_symbol(f"madeupword{padding:05d}", n=0)
        padding += 1
    for lang in (SRC, TGT):
        d.save(os.path.join(bin_dir, f"dict.{lang}.txt"))
    padding += base["padding_symbols"]
    return write_info(out, dict(base, nominal=nominal, vocab=len(d), padding_symbols=padding, bin=bin_dir,
                                padded_from=base["nominal"]))


def pad_teacher(base_path, info, save_dir):
    """``base_path``'s teacher with zero rows appended to its embeddings and output layer for the padding
    symbols of ``info`` (logit 0: its greedy translations are the base teacher's wherever its best token
    scores above 0), its data directory set to ``info``'s; read by the safe loader, written atomically."""
    import torch
    from omegaconf import OmegaConf

    from fairseq_kd.checkpoints import load_checkpoint_state

    path = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.isfile(path):
        return path
    state = load_checkpoint_state(base_path)
    for key, weight in state["model"].items():
        if key.endswith(("embed_tokens.weight", "output_projection.weight")) and weight.size(0) < info["vocab"]:
            state["model"][key] = torch.cat([weight, weight.new_zeros(info["vocab"] - weight.size(0), weight.size(1))])
    cfg = state["cfg"]
    OmegaConf.set_struct(cfg, False)
    cfg.task.data = info["bin"]
    state["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    recorded = (state.get("task_state") or {}).get("dictionary_sha256")
    if recorded:  # the padded dictionaries are the ones it is trained with now
        from fairseq_kd.teacher.ensemble import dictionary_sha256

        for name in list(recorded):
            recorded[name] = dictionary_sha256(os.path.join(info["bin"], name))
    os.makedirs(save_dir, exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def prepare_vocab(data_root, work, nominal, limits, threads, train_pairs=None):
    """Joint SentencePiece (``hard_vocab_limit`` off: a small corpus may not hold ``nominal`` pieces) and
    a fairseq dictionary padded with unused symbols up to ``nominal`` entries, both learnt from the
    training pairs of ``limits``; only the first ``train_pairs`` of them are binarized (the batches timed,
    the cache and the decoding teacher need no more).  Returns the data info."""
    import sentencepiece as spm
    from fairseq.data import Dictionary

    from fairseq_kd.corpora import locate_corpus
    from fairseq_kd.prepare import encode, slice_corpus

    out = os.path.join(work, f"v{nominal}")
    bin_dir = os.path.join(out, "bin")
    info = finished_info(out)
    if info is not None:
        return info
    raw = os.path.join(out, "raw")
    slice_corpus(locate_corpus(CORPUS, data_root), raw, (SRC, TGT), limits)
    prefix = os.path.join(out, "spm")
    spm.SentencePieceTrainer.train(
        input=",".join(os.path.join(raw, f"train.{lang}") for lang in (SRC, TGT)), model_prefix=prefix,
        vocab_size=nominal, hard_vocab_limit=False, character_coverage=1.0, model_type="unigram",
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, num_threads=threads, minloglevel=2,
    )
    pieces = spm.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size()
    spm_text = os.path.join(out, "spm_text")
    encode(prefix + ".model", raw, spm_text, (SRC, TGT))
    d = Dictionary()
    for lang in (SRC, TGT):
        Dictionary.add_file_to_dictionary(os.path.join(spm_text, f"train.{lang}"), d, lambda s: s.split(), 1)
    d.finalize(padding_factor=8)
    padding = 0
    while len(d) < nominal:
        d.add_symbol(f"madeupword{padding:05d}", n=0)
        padding += 1
    os.makedirs(out, exist_ok=True)
    dict_file = os.path.join(out, "dict.txt")
    d.save(dict_file)
    from fairseq import options
    from fairseq_cli import preprocess

    trainpref = os.path.join(spm_text, "train")
    if train_pairs:
        for lang in (SRC, TGT):
            with open(f"{trainpref}.{lang}", encoding="utf-8") as f, \
                    open(f"{trainpref}_bin.{lang}", "w", encoding="utf-8") as head:
                for i, line in enumerate(f):
                    if i == train_pairs:
                        break
                    head.write(line)
        trainpref += "_bin"
    preprocess.main(options.get_preprocessing_parser().parse_args([
        "--source-lang", SRC, "--target-lang", TGT,
        "--trainpref", trainpref, "--validpref", os.path.join(spm_text, "valid"),
        "--testpref", os.path.join(spm_text, "test"), "--destdir", bin_dir, "--srcdict", dict_file,
        "--tgtdict", dict_file, "--workers", "1",
    ]))
    # Seq-KD's training targets: the gold targets stand in for the teacher's translations (same step cost)
    for ext in ("bin", "idx"):
        shutil.copy(os.path.join(bin_dir, f"train.{SRC}-{TGT}.{TGT}.{ext}"),
                    os.path.join(bin_dir, f"{TEACHER_TARGET_SUBSET}.{SRC}-{TGT}.{TGT}.{ext}"))
    return write_info(out, {"nominal": nominal, "vocab": len(d), "sentencepiece_pieces": pieces,
                            "padding_symbols": padding, "bin": bin_dir, "raw": raw,
                            "train_pairs_binarized": train_pairs})


def arch_args(arch):
    a = ARCHS[arch]
    return [
        "--arch", "transformer", "--share-all-embeddings",
        "--encoder-layers", str(a["layers"]), "--decoder-layers", str(a["layers"]),
        "--encoder-embed-dim", str(a["dim"]), "--decoder-embed-dim", str(a["dim"]),
        "--encoder-ffn-embed-dim", str(a["ffn"]), "--decoder-ffn-embed-dim", str(a["ffn"]),
        "--encoder-attention-heads", str(a["heads"]), "--decoder-attention-heads", str(a["heads"]),
    ]


def train_teacher(bin_dir, save_dir, arch, updates, max_tokens):
    """A teacher checkpoint by fairseq-train's ``main`` in this process (``updates`` updates of plain
    label-smoothed training)."""
    from fairseq import options
    from fairseq.distributed import utils as distributed_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli.train import main as train_main

    path = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.isfile(path):
        return path
    argv = [bin_dir, "--save-dir", save_dir, *arch_args(arch),
         "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--dropout", "0.1",
         "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", str(max(1, min(100, updates // 3))), "--max-tokens", str(max_tokens),
         "--max-update", str(updates), "--cpu", "--seed", "1", "--no-epoch-checkpoints",
         "--no-save-optimizer-state", "--num-workers", "0", "--log-format", "simple",
         "--log-interval", "50", "--no-progress-bar", "--disable-validation"]
    quiet_logging()  # fairseq_cli.train logs to stdout, where the table goes
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # not timed: every core
    try:
        distributed_utils.call_main(cfg, train_main)
    finally:
        torch.set_num_threads(threads)
    if not os.path.isfile(path):
        raise SystemExit(f"benchmark: fairseq-train wrote no {path}")
    return path


# ---- one training setup: task, student, criterions, optimizer, batches ------------------------------------------------


def parse_cfg(bin_dir, arch, teacher, max_tokens, criterion_args, cache_dir=None):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    task = ["--task", "distillation_translation", "--teacher-target-subset", TEACHER_TARGET_SUBSET]
    task += ["--teacher-cache", cache_dir] if cache_dir else ["--teacher-path", teacher]
    argv = [bin_dir, "-s", SRC, "-t", TGT, *task, *arch_args(arch), *criterion_args,
            "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.0005", "--clip-norm", "1.0",
            "--max-tokens", str(max_tokens), "--cpu", "--seed", "1", "--dropout", "0.1"]
    parser = options.get_training_parser()
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))


class Setup:
    """A task, a student, the criterions and one optimizer over the student and the criterions' parameters."""

    def __init__(self, bin_dir, arch, teacher, max_tokens, names, cache_dir=None, num_batches=4, seed=1):
        import numpy as np
        import torch
        from fairseq import tasks
        from fairseq.data import data_utils

        import fairseq_kd  # noqa: F401  (registrations, safe checkpoint loading)

        torch.manual_seed(seed)
        self.criteria = {}
        self.skipped = {}
        # task, model and optimizer settings are the same in every criterion's config: taken from the first
        cfgs = [parse_cfg(bin_dir, arch, teacher, max_tokens,
                          (CACHED if cache_dir else CRITERIA)[name.replace("_cached", "")], cache_dir)
                for name in names]
        base_cfg = cfgs[0]
        self.task = tasks.setup_task(base_cfg.task)
        self.task.load_dataset("train")
        self.model = self.task.build_model(base_cfg.model)
        for name, cfg in zip(names, cfgs):
            try:
                self.criteria[name] = self.task.build_criterion(cfg.criterion)
            except Exception as e:  # e.g. a criterion that refuses the cache
                self.skipped[name] = f"{type(e).__name__}: {e}"
        params = list(self.model.parameters())
        for crit in self.criteria.values():
            params += [p for p in crit.parameters() if p.requires_grad]
        from fairseq import optim

        self.optimizer = optim.build_optimizer(base_cfg.optimizer, params)
        self.clip_norm = base_cfg.optimization.clip_norm
        dataset = self.task.dataset("train")
        rng = np.random.RandomState(seed)
        with data_utils.numpy_seed(seed):  # the same batches in every setup and process
            indices = dataset.ordered_indices()
        batches = dataset.batch_by_size(indices, max_tokens=max_tokens)
        picks = rng.choice(len(batches), size=min(num_batches, len(batches)), replace=False)
        self.batches = [dataset.collater([dataset[int(i)] for i in batches[p]]) for p in sorted(picks)]
        self.update = 0

    def teacher(self):
        return getattr(self.task, "teacher", None)

    def step(self, name, sample):
        """fairseq's Trainer.train_step for one batch: forward, backward, scaling, clipping, optimizer, metrics."""
        from fairseq import metrics

        criterion = self.criteria[name]
        self.model.train()
        criterion.train()
        self.optimizer.zero_grad()
        loss, sample_size, logging_output = self.task.train_step(
            sample, self.model, criterion, self.optimizer, self.update
        )
        self.optimizer.multiply_grads(1.0 / float(sample_size or 1.0))
        self.optimizer.clip_grad_norm(self.clip_norm)
        self.optimizer.step()
        self.update += 1
        with metrics.aggregate(new_root=True):
            criterion.__class__.reduce_metrics([logging_output])


def cpu_time():
    return time.process_time()


def time_steps(entries, reps):
    """Median over ``reps`` interleaved repetitions of the mean CPU seconds per step of each
    ``(setup, name)`` of ``entries`` (after a warm-up step; the order rotates every repetition)."""
    times = {n: [] for _, n in entries}
    warmed = set()
    for setup, n in entries:
        # the first step of a setup allocates the optimizer's state, a criterion's own parameters theirs
        has_params = any(True for _ in setup.criteria[n].parameters())
        if id(setup) not in warmed or has_params:
            setup.step(n, setup.batches[0])
            warmed.add(id(setup))
    for rep in range(reps):
        shift = rep % len(entries)
        for setup, n in entries[shift:] + entries[:shift]:
            start = cpu_time()
            for sample in setup.batches:
                setup.step(n, sample)
            times[n].append((cpu_time() - start) / len(setup.batches))
    return {n: statistics.median(v) for n, v in times.items()}


def time_passes(setup, reps):
    """The single passes the floors are made of, CPU seconds per batch (medians over ``reps``):
    ``student``: the student's forward + backward (LS-NLL), ``optimizer``: scaling, clipping and the step,
    ``teacher``: the teacher's forward, ``greedy``: the teacher's greedy translation of the batch
    (hybrid_gated_kd's online targets), ``student_hyp``: the student's forward + backward on those
    translations."""
    import torch

    from fairseq_kd import losses
    from fairseq_kd.teacher.greedy import greedy_teacher_translation, max_decoder_positions

    teacher = setup.teacher().to_like(setup.model)
    model, opt, pad = setup.model, setup.optimizer, setup.task.target_dictionary.pad()
    eos = setup.task.target_dictionary.eos()
    hyps = [
        greedy_teacher_translation(teacher, s["net_input"], pad, eos, 1.2, 10, max_decoder_positions(model, teacher))
        for s in setup.batches
    ]

    def student(net_input, prev, target):
        opt.zero_grad()
        model.train()
        logits = model(net_input["src_tokens"], net_input["src_lengths"], prev)[0]
        loss, _ = losses.label_smoothed_nll(logits, target, pad, 0.1)
        loss.backward()

    results = {k: [] for k in ("student", "optimizer", "teacher", "greedy", "student_hyp")}
    for _ in range(reps):
        acc = dict.fromkeys(results, 0.0)
        for sample, hyp in zip(setup.batches, hyps):
            t = cpu_time()
            student(sample["net_input"], sample["net_input"]["prev_output_tokens"], sample["target"])
            acc["student"] += cpu_time() - t
            t = cpu_time()
            opt.multiply_grads(1.0 / float(sample["ntokens"]))
            opt.clip_grad_norm(setup.clip_norm)
            opt.step()
            acc["optimizer"] += cpu_time() - t
            t = cpu_time()
            student(sample["net_input"], hyp["prev_output_tokens"], hyp["target"])
            acc["student_hyp"] += cpu_time() - t
            opt.zero_grad()
            with torch.no_grad():
                t = cpu_time()
                teacher(sample["net_input"])
                acc["teacher"] += cpu_time() - t
                t = cpu_time()
                greedy_teacher_translation(teacher, sample["net_input"], pad, eos, 1.2, 10,
                                           max_decoder_positions(model, teacher))
                acc["greedy"] += cpu_time() - t
        for k in results:
            results[k].append(acc[k] / len(setup.batches))
    return {k: statistics.median(v) for k, v in results.items()}


# ---- peak memory: one criterion per fresh child process ---------------------------------------------------------------


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
    ctx.set_forkserver_preload(["__main__", "torch", "fairseq", "fairseq.tasks", "fairseq_kd"])
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


# ---- the offline top-k cache (when the tree has it) -------------------------------------------------------------------


def cache_module():
    try:
        import fairseq_kd.cache as cache
    except ImportError as e:
        return None, f"fairseq_kd.cache is not in this tree ({e})"
    return cache, None


def build_cache(bin_dir, teacher, out_dir, threads):
    """The k = 8 top-k cache of the training split, built by the cache's own command
    (``python -m fairseq_kd.cache build``); returns (dir, data bytes per target token,
    index bytes per target token)."""
    from fairseq.data import data_utils

    if not os.path.isfile(os.path.join(out_dir, "manifest.json")):
        run([sys.executable, "-m", "fairseq_kd.cache", "build", "--data", bin_dir, "--split", "train",
             "--path", teacher, "--out-dir", out_dir, "--k", str(CACHE_K), "--cpu", "--no-progress-bar"], threads)
    # keep the dataset alive while its sizes are read: they are a view of its memory map
    target = data_utils.load_indexed_dataset(os.path.join(bin_dir, f"train.{SRC}-{TGT}.{TGT}"), None, None)
    tokens = int(target.sizes.sum())
    del target
    data = index = 0
    for folder, _, files in os.walk(out_dir):
        for name in files:
            data += os.path.getsize(os.path.join(folder, name)) if name.endswith(".bin") else 0
            index += os.path.getsize(os.path.join(folder, name)) if name.endswith(".idx") else 0
    return out_dir, data / tokens, index / tokens


# ---- teacher decoding ------------------------------------------------------------------------------------------------


def bleu(hyps, refs):
    import sacrebleu

    return sacrebleu.corpus_bleu(hyps, [refs]).score


def decode_fairseq_generate(bin_dir, teacher, beam, max_tokens, threads, n):
    from fairseq_kd.scoring import read_generate_output

    proc = run([sys.executable, "-m", "fairseq_cli.generate", bin_dir, "--user-dir", os.path.join(REPO, "user_dir"),
                "--path", teacher, "--gen-subset", "test", "--beam", str(beam), "--max-tokens", str(max_tokens),
                "--max-len-a", "1.2", "--max-len-b", "10", "--required-batch-size-multiple", "1",
                "--remove-bpe", "sentencepiece", "--cpu", "--num-workers", "0"], threads)
    import re

    m = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s",
                  proc.stdout + proc.stderr)
    if not m:
        raise SystemExit("benchmark: fairseq-generate printed no 'Translated N sentences' line")
    count = int(m.group(1).replace(",", ""))
    seconds = count / float(m.group(4))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(proc.stdout)
    hyps = read_generate_output(f.name)
    os.unlink(f.name)
    if count != n or len(hyps) != n:
        raise SystemExit(f"benchmark: fairseq-generate translated {len(hyps)} of {n} sentences")
    return seconds, [hyps[i] for i in range(n)]


def decode_backend(backend, corpus, max_tokens, out_dir):
    from fairseq_kd.decoding import decode_corpus, remove_bpe

    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    decode_corpus(corpus, backend.translate, out_dir, max_tokens=max_tokens,
                  max_source_len=backend.max_source_len, progress=False)
    seconds = time.perf_counter() - start
    hyps = {}
    for name in os.listdir(out_dir):
        if name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    hyps[rec["id"]] = remove_bpe(rec["hyps"][0]["text"], "sentencepiece") if rec["hyps"] else ""
    return seconds, [hyps[i] for i in range(len(corpus))]


def benchmark_decoding(bin_dir, raw_dir, teacher, reps, beam, max_tokens, threads, work):
    import torch

    from fairseq_kd.decoding import corpus_from_split
    from fairseq_kd.decoding.ctranslate2_backend import CTranslate2Backend
    from fairseq_kd.decoding.fairseq_backend import FairseqBackend, build_task

    with open(os.path.join(raw_dir, f"test.{TGT}"), encoding="utf-8") as f:
        refs = [line.rstrip("\n") for line in f]
    task = build_task(bin_dir, SRC, TGT)
    corpus = corpus_from_split(bin_dir, "test", SRC, TGT, task.source_dictionary, task.target_dictionary)
    n = len(corpus)
    settings = {"beam": beam, "nbest": 1, "max_len_a": 1.2, "max_len_b": 10, "min_len": 1, "lenpen": 1.0,
                "unkpen": 0.0, "teacher": [teacher]}
    cpu = torch.device("cpu")
    backends = {"fairseq_backend": FairseqBackend(task, teacher, settings, cpu)}
    for ct in ("float32", "int8"):
        backends[f"ct2_{ct}"] = CTranslate2Backend(task, teacher, settings, cpu, compute_type=ct)
    names = ["fairseq_generate"] + list(backends)
    seconds = {k: [] for k in names}
    outputs = {}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            if name == "fairseq_generate":
                s, hyps = decode_fairseq_generate(bin_dir, teacher, beam, max_tokens, threads, n)
            else:
                s, hyps = decode_backend(backends[name], corpus, max_tokens, os.path.join(work, "decode", name))
            seconds[name].append(s)
            outputs[name] = hyps
            log(f"decode {name}: {n / s:.1f} sentences/s")
    result = {}
    for name in names:
        sec = statistics.median(seconds[name])
        result[name] = {"sentences_per_second": n / sec, "seconds": sec, "bleu": bleu(outputs[name], refs)}
    result["sentences"] = n
    return result


# ---- report ----------------------------------------------------------------------------------------------------------


def summary_json(per_vocab, decode):
    """``{"vocab": {"8000": {"step_time_ratio": {NAME: r}, "peak_memory_ratio": {NAME: r},
    "teacher_forward_share": r}, "32000": {...}}, "decode": {"ct2_float32": {"speedup": r, "bleu_delta": d},
    "ct2_int8": {...}}}`` plus, under ``"details"``, the achieved vocabulary sizes, absolute times,
    passes, floors, decoding speeds and BLEU, and the skipped rows with their reasons."""
    out = {"vocab": {}, "decode": {}, "details": {"vocab": {}, "decode": decode}}
    for nominal, r in per_vocab.items():
        out["vocab"][str(nominal)] = {
            "step_time_ratio": r["step_time_ratio"],
            "peak_memory_ratio": r["peak_memory_ratio"],
            "teacher_forward_share": r["teacher_forward_share"],
        }
        out["details"]["vocab"][str(nominal)] = {k: v for k, v in r.items() if k not in out["vocab"][str(nominal)]}
    base = decode["fairseq_generate"]
    for name in ("ct2_float32", "ct2_int8"):
        out["decode"][name] = {
            "speedup": decode[name]["sentences_per_second"] / base["sentences_per_second"],
            "bleu_delta": decode[name]["bleu"] - base["bleu"],
        }
    return out


def targets(per_vocab, decode_summary):
    """(description, value, limit[, True]) of every target of docs/performance.md; a target holds when
    value <= limit (value >= limit for the rows marked True)."""
    rows = []
    for nominal, r in per_vocab.items():
        st, mem, share = r["step_time_ratio"], r["peak_memory_ratio"], r["teacher_forward_share"]
        if "word_kd_cached" in st:
            rows.append((f"V={nominal} word_kd_cached step time", st["word_kd_cached"], 1.10))
            rows.append((f"V={nominal} word_kd_cached peak memory", mem["word_kd_cached"], 1.15))
        rows.append((f"V={nominal} word_kd step time (1 + teacher share + 0.10)", st["word_kd"], 1.0 + share + 0.10))
        floors = r["floors"]
        rows.append((f"V={nominal} tie_kd step time (floor + 0.15)", st["tie_kd"], floors["tie_kd"] + 0.15))
        rows.append((f"V={nominal} hybrid_gated_kd step time (floor + 0.25)", st["hybrid_gated_kd"],
                     floors["hybrid_gated_kd"] + 0.25))
        if nominal == 32000:
            for name, m in mem.items():
                rows.append((f"V={nominal} {name} peak memory", m, 1.3))
        if r.get("cache_bytes_per_token") is not None:
            rows.append((f"V={nominal} cache bytes per target token (k={CACHE_K})", r["cache_bytes_per_token"], 32.0))
    for name, (speed, bleu_limit) in {"ct2_float32": (2.0, 0.3), "ct2_int8": (1.5, 0.8)}.items():
        d = decode_summary[name]
        rows.append((f"{name} speedup over fairseq-generate", d["speedup"], speed, True))
        rows.append((f"{name} |BLEU delta|", abs(d["bleu_delta"]), bleu_limit))
    return rows


def print_report(per_vocab, decode, summary, skipped):
    names = []
    for r in per_vocab.values():
        names += [n for n in r["step_time_ratio"] if n not in names]
    vocabs = list(per_vocab)
    header = "| criterion | " + " | ".join(f"step V={v} | memory V={v}" for v in vocabs) + " |"
    print()
    print(header)
    print("|---|" + "---:|---:|" * len(vocabs))
    for n in names:
        cells = []
        for v in vocabs:
            st, mem = per_vocab[v]["step_time_ratio"].get(n), per_vocab[v]["peak_memory_ratio"].get(n)
            cells += [f"{st:.2f}" if st is not None else "-", f"{mem:.2f}" if mem is not None else "-"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    cells = []
    for v in vocabs:
        cells += [f"{per_vocab[v]['teacher_forward_share']:.2f}", "-"]
    print("| teacher forward alone | " + " | ".join(cells) + " |")
    print()
    for v in vocabs:
        r = per_vocab[v]
        print(f"V={v}: dictionary {r['vocab']} symbols ({r['sentencepiece_pieces']} SentencePiece pieces, "
              f"{r['padding_symbols']} unused padding symbols); plain step {r['plain_step_seconds'] * 1000:.0f} ms CPU, "
              f"peak {r['plain_peak_bytes'] / 2**20:.0f} MiB above construction")
        p, f = r["passes"], r["floors"]
        print(f"  passes (ms CPU): student fwd+bwd {p['student'] * 1000:.0f}, optimizer {p['optimizer'] * 1000:.0f}, "
              f"teacher forward {p['teacher'] * 1000:.0f}, teacher greedy {p['greedy'] * 1000:.0f}, "
              f"student on greedy targets {p['student_hyp'] * 1000:.0f}")
        print(f"  floors: tie_kd {f['tie_kd']:.2f} (3 x (student + teacher) + optimizer), hybrid_gated_kd "
              f"{f['hybrid_gated_kd']:.2f} (student + student on greedy targets + teacher + greedy + optimizer)")
        if r.get("cache_bytes_per_token") is not None:
            print(f"  cache (k = {CACHE_K}): {r['cache_bytes_per_token']:.1f} data bytes per target token "
                  f"(+ {r['cache_index_bytes_per_token']:.1f} index bytes)")
    print()
    print(f"decoding {decode['sentences']} test sentences, beam 5:")
    for name in ("fairseq_generate", "fairseq_backend", "ct2_float32", "ct2_int8"):
        d = decode[name]
        print(f"  {name:17s} {d['sentences_per_second']:7.1f} sentences/s  BLEU {d['bleu']:.2f}")
    for name, d in summary["decode"].items():
        print(f"  {name}: {d['speedup']:.2f}x fairseq-generate, BLEU delta {d['bleu_delta']:+.2f}")
    for reason in skipped:
        print(f"skipped: {reason}")
    print()
    print("targets:")
    for desc, value, limit, *higher in targets(per_vocab, summary["decode"]):
        if higher:
            if value >= limit:
                print(f"  met     {desc}: {value:.2f} >= {limit:.2f}")
            else:
                print(f"  MISSED  {desc}: {value:.2f} < {limit:.2f} (by {limit - value:.2f})")
        elif value <= limit:
            print(f"  met     {desc}: {value:.2f} <= {limit:.2f}")
        else:
            print(f"  MISSED  {desc}: {value:.2f} > {limit:.2f} (by {value - limit:.2f})")


# ---- main ------------------------------------------------------------------------------------------------------------


def benchmark_vocab(info, arch, teacher, args, skipped, work):
    nominal = info["nominal"]
    names = list(CRITERIA)
    cache_dir = bytes_per_token = index_per_token = None
    cache, reason = cache_module()
    if cache is None:
        skipped.append(f"V={nominal} *_cached rows: {reason}")
    else:
        cache_dir, bytes_per_token, index_per_token = build_cache(
            info["bin"], teacher, os.path.join(work, f"cache_v{nominal}"), args.threads)
    log(f"V={nominal}: peak memory, one fresh child process per criterion")
    spec = {"bin": info["bin"], "arch": arch, "teacher": teacher, "max_tokens": args.max_tokens,
            "batches": 2, "threads": args.threads}  # two steps: the second with the optimizer's state
    memory = measure_memory(spec, names)
    if cache_dir:
        memory.update(measure_memory(dict(spec, cache_dir=cache_dir), [n + "_cached" for n in CACHED]))
    for name, m in list(memory.items()):
        if "skipped" in m:
            skipped.append(f"V={nominal} {name}: {m['skipped']}")
            del memory[name]

    log(f"V={nominal}: building the setups")
    setup = Setup(info["bin"], arch, teacher, args.max_tokens, names, num_batches=args.batches)
    cached, cached_names = None, []
    if cache_dir:
        try:
            # its own task (--teacher-cache instead of --teacher-path): the same batches plus the cache's rows
            cached = Setup(info["bin"], arch, teacher, args.max_tokens, [n + "_cached" for n in CACHED],
                           cache_dir=cache_dir, num_batches=args.batches)
        except (Exception, SystemExit) as e:
            skipped.append(f"V={nominal} *_cached rows: the cached task cannot be built ({type(e).__name__}: {e})")
        else:
            cached_names = list(cached.criteria)
    entries = [(setup, n) for n in names] + [(cached, n) for n in cached_names]
    log(f"V={nominal}: timing {len(entries)} criterions x {len(setup.batches)} batches x {args.reps} repetitions")
    times = time_steps(entries, args.reps)
    passes = time_passes(setup, args.reps)
    del setup, cached
    plain = times[PLAIN]
    plain_peak = memory[PLAIN]["peak_bytes"]
    floors = {
        "tie_kd": (3 * (passes["student"] + passes["teacher"]) + passes["optimizer"]) / plain,
        "hybrid_gated_kd": (passes["student"] + passes["student_hyp"] + passes["teacher"] + passes["greedy"]
                            + passes["optimizer"]) / plain,
    }
    timed = names + cached_names
    return {
        "step_time_ratio": {n: times[n] / plain for n in timed},
        "peak_memory_ratio": {n: memory[n]["peak_bytes"] / plain_peak for n in memory},
        "teacher_forward_share": passes["teacher"] / plain,
        "vocab": info["vocab"], "sentencepiece_pieces": info["sentencepiece_pieces"],
        "padding_symbols": info["padding_symbols"], "plain_step_seconds": plain,
        "plain_peak_bytes": plain_peak, "step_seconds": {n: times[n] for n in timed},
        "peak_bytes": {n: memory[n]["peak_bytes"] for n in memory}, "memory_method": memory[PLAIN]["how"],
        "passes": passes, "floors": floors, "batches": args.batches, "max_tokens": args.max_tokens,
        "cache_bytes_per_token": bytes_per_token, "cache_index_bytes_per_token": index_per_token,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.path.join(os.path.dirname(REPO), "shared", "data"),
                        help="folder holding multi30k_en_de (default: ../shared/data next to the checkout)")
    parser.add_argument("--work-dir", help="where data, teachers and conversions are kept (default: a temporary "
                        "folder, removed at the end); a kept one is reused by the next run")
    parser.add_argument("--json", help="write the ratios to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, 2,000 training pairs, 100 decoded sentences, fewer repetitions (CI)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default: 2)")
    parser.add_argument("--batches", type=int, help="batches per repetition (default: 1)")
    parser.add_argument("--max-tokens", type=int, help="tokens per batch (default: 1024; quick: 512)")
    parser.add_argument("--decode-sentences", type=int, help="test sentences decoded (default: 1000; quick: 100)")
    parser.add_argument("--teacher-updates", type=int, help="updates of the teacher (default: 150; quick: 30)")
    parser.add_argument("--train-pairs", type=int, help="training pairs binarized for the timed batches, the cache "
                        "and the decoding teacher (default: 4000; quick: 2000); SentencePiece and the dictionary "
                        "are learnt from all of them (quick: from the 2,000)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every timed run (default: 1)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.reps = args.reps or 2
    args.batches = args.batches or 1
    args.max_tokens = args.max_tokens or (512 if quick else 1024)
    args.decode_sentences = args.decode_sentences or (100 if quick else 1000)
    args.teacher_updates = args.teacher_updates or (30 if quick else 150)
    arch = "quick" if quick else "full"

    import torch

    import fairseq_kd  # noqa: F401  (registrations, safe checkpoint loading)

    torch.set_num_threads(args.threads)
    quiet_logging()
    warnings.filterwarnings("ignore")  # hydra's and torch's deprecation notices, once per config
    started = time.time()
    work = args.work_dir or tempfile.mkdtemp(prefix="fairseq-kd-benchmark.")
    os.makedirs(work, exist_ok=True)
    args.train_pairs = args.train_pairs or (2000 if quick else 4000)
    limits = {"train": 2000 if quick else None, "valid": 100, "test": args.decode_sentences}
    skipped = []
    try:
        small, large = NOMINAL_VOCABS
        log(f"data: Multi30k {SRC}-{TGT}, SentencePiece vocabulary {small}, and its dictionary padded to {large}")
        infos = {small: prepare_vocab(args.data_root, work, small, limits, args.threads, args.train_pairs)}
        infos[large] = pad_vocab(infos[small], work, large)
        log(f"teacher: fairseq-train, {args.teacher_updates} updates; the V={large} teacher is it with zero rows "
            f"for the padding symbols (it translates alike)")
        teachers = {small: train_teacher(infos[small]["bin"], os.path.join(work, f"teacher_v{small}"), arch,
                                         args.teacher_updates, args.max_tokens)}
        teachers[large] = pad_teacher(teachers[small], infos[large], os.path.join(work, f"teacher_v{large}"))
        per_vocab = {}
        for nominal in NOMINAL_VOCABS:
            per_vocab[nominal] = r = benchmark_vocab(infos[nominal], arch, teachers[nominal], args, skipped, work)
            log(f"V={nominal} done (step time / peak memory ratios): " + ", ".join(
                f"{n} {t:.2f}/{r['peak_memory_ratio'].get(n, math.nan):.2f}" for n, t in r["step_time_ratio"].items()))
        log(f"decoding {args.decode_sentences} sentences: fairseq-generate, fairseq backend, CTranslate2 float32/int8")
        info = infos[NOMINAL_VOCABS[0]]
        decode = benchmark_decoding(info["bin"], info["raw"], teachers[NOMINAL_VOCABS[0]], args.reps, 5,
                                    args.max_tokens, args.threads, work)
        summary = summary_json(per_vocab, decode)
        summary["details"].update({
            "command": " ".join(["python", "scripts/benchmark.py"] + (argv if argv is not None else sys.argv[1:])),
            "quick": quick, "arch": ARCHS[arch], "threads": args.threads, "reps": args.reps,
            "teacher_updates": args.teacher_updates, "skipped": skipped, "cpu_count": os.cpu_count(),
            "seconds": time.time() - started, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        })
        print_report(per_vocab, decode, summary, skipped)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, args.json)
        log(f"done in {time.time() - started:.0f} s")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
