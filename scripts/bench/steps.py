"""Timed training steps: one task, student and optimizer, the criterions over the same batches (fairseq's Trainer.train_step), and the single passes the floors are made of."""

import statistics
import time

from bench.common import CACHED, CRITERIA, SRC, TEACHER_TARGET_SUBSET, TGT
from bench.data import arch_args


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

        import fairseq_kd

        fairseq_kd.register()  # the tasks, criterions and the safe checkpoint loader

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
    translations; ``student_gen``: the student's own sampled translation of the batch (on_policy_kd's
    generation, temperature 1), ``teacher_gen`` and ``student_on_gen``: the teacher's forward and the
    student's forward + backward on it."""
    import torch

    from fairseq_kd import losses
    from fairseq_kd.criterions.on_policy_kd import student_translation
    from fairseq_kd.teacher.greedy import greedy_teacher_translation, max_decoder_positions, shift_right

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

    def generate(net_input, seed):  # on_policy_kd's defaults: sampled at temperature 1, a = 1.2, b = 10
        return student_translation(model, net_input, pad, eos, 1.2, 10, max_decoder_positions(model, teacher), 1.0,
                                   torch.Generator().manual_seed(seed))

    own = [generate(s["net_input"], i) for i, s in enumerate(setup.batches)]
    results = {k: [] for k in ("student", "optimizer", "teacher", "greedy", "student_hyp", "student_gen",
                               "teacher_gen", "student_on_gen")}
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
        for i, (sample, gen) in enumerate(zip(setup.batches, own)):
            t = cpu_time()
            generate(sample["net_input"], i)
            acc["student_gen"] += cpu_time() - t
            prev = shift_right(gen, pad, eos)
            with torch.no_grad():
                t = cpu_time()
                teacher(dict(sample["net_input"], prev_output_tokens=prev))
                acc["teacher_gen"] += cpu_time() - t
            t = cpu_time()
            student(sample["net_input"], prev, gen)
            acc["student_on_gen"] += cpu_time() - t
            opt.zero_grad()
        for k in results:
            results[k].append(acc[k] / len(setup.batches))
    return {k: statistics.median(v) for k, v in results.items()}


# ---- peak memory: one criterion per fresh child process ---------------------------------------------------------------

