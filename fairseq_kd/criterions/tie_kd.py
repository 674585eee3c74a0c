"""TIE-KD (Zhang et al., ACL 2023, arXiv 2305.08096; code songmzhang/NMT-KD).

``loss = (1 - alpha) * LS-NLL(gold) + alpha * (1/N) * sum_n sum_m (KL_n + rank_n)``: the KL with the
reference's ``log(p + 1e-6)`` (:func:`fairseq_kd.losses.tie_kd_kl`) plus the hierarchical ranking loss
over the top ``--tie-topk`` tokens (:func:`fairseq_kd.losses.hierarchical_ranking`); pass 1 decodes
the gold prefixes, each later pass the student's shifted greedy predictions of the previous one, both
encoders run once, the LS-NLL on pass 1 only (docs/tie_kd.md).  The student's encoder and decoder
are called separately, so multi-GPU training needs ``--ddp-backend legacy_ddp``.  In training each
pass is backpropagated as soon as its loss is formed (``backward_per_pass``), so one pass's
``[tokens, V]`` tensors are alive at a time.
"""

from dataclasses import dataclass, field
from typing import Iterator, Tuple

from fairseq.criterions import register_criterion
from fairseq.logging import metrics
from torch import Tensor

from fairseq_kd import losses
from fairseq_kd.criterions.base import KDCriterion, KDCriterionConfig
from fairseq_kd.errors import DistillationError
from fairseq_kd.losses.block_max import argmax_ids
from fairseq_kd.losses.common import agreement_from_ids
from fairseq_kd.losses.ranking import shift_predictions


@dataclass
class TieKDConfig(KDCriterionConfig):
    tie_topk: int = field(default=5, metadata={
        "help": "k of the ranking loss: how many of the teacher's and of the student's most probable tokens "
        "are ranked against each other"})
    tie_iterations: int = field(default=3, metadata={
        "help": "decoder passes per batch (N); pass 1 reads the gold prefixes, every later pass the student's "
        "greedy predictions of the previous one; 1 turns the iterative part off"})
    tie_no_rank: bool = field(default=False, metadata={
        "help": "ablation: drop the hierarchical ranking loss, keep only the KL term"})
    tie_exact_kl: bool = field(default=False, metadata={
        "help": "use the exact KL (log-softmax) instead of the reference code's log(p + 1e-6) on both distributions"})
    tie_keep_pad_predictions: bool = field(default=False, metadata={
        "help": "feed predicted pad ids back as the reference code does; by default they are replaced by unk "
        "so that the decoder does not mask them as padding"})


@register_criterion("tie_kd", dataclass=TieKDConfig)
class TieKDCriterion(KDCriterion):
    per_token_keys = ("kd_loss", "rank_loss")
    #: per-pass top-1 agreement: ``{prefix}{n}`` counts, logged as ``kd_top1_agree_iter{n}``
    iteration_agree_prefix = "kd_agree_iter"
    #: the student's encoder and decoder are called separately: the task refuses torch's DDP
    calls_model_parts = True
    #: the task hands ``forward`` a ``backward`` callable and leaves the backward to it
    backward_per_pass = True

    def __init__(self, task, cfg: TieKDConfig):
        super().__init__(task, cfg)
        vocab = len(task.target_dictionary)
        if not 1 <= cfg.tie_topk <= vocab:
            raise DistillationError(
                f"--tie-topk must be in [1, {vocab}] (the target vocabulary size), got {cfg.tie_topk}"
            )
        if cfg.tie_iterations < 1:
            raise DistillationError(f"--tie-iterations must be >= 1, got {cfg.tie_iterations}")
        if cfg.kd_temperature != 1.0:
            raise DistillationError(
                f"tie_kd has no temperature (its ranking compares plain probabilities): "
                f"drop --kd-temperature {cfg.kd_temperature}"
            )
        self.topk = cfg.tie_topk
        self.iterations = cfg.tie_iterations
        self.ranking = not cfg.tie_no_rank
        self.log_epsilon = 0.0 if cfg.tie_exact_kl else losses.TIE_KD_LOG_EPSILON
        self.pad_replacement = None if cfg.tie_keep_pad_predictions else task.target_dictionary.unk()

    def decoding_passes(self, model, net_input, teacher, argmaxes=None, shared=None) -> Iterator[Tuple[Tensor, ...]]:
        """Yield ``(prev_output_tokens, student_logits, teacher distribution)`` for the ``N`` passes; both
        encoders run once, the student's decoder reads ``shared(encoder_out)`` when given.  With
        ``argmaxes`` the caller appends each pass's ``(student, teacher)`` argmaxes to it, and the
        next prefix reuses the student's (no logits are held here)."""
        prev = net_input["prev_output_tokens"]
        if prev[:, 0].eq(self.padding_idx).any():
            raise DistillationError("tie_kd needs right-padded targets; do not pass --left-pad-target")
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        encoder_out = shared(encoder_out) if shared is not None else encoder_out
        teacher_encoder_outs = teacher.forward_encoder(net_input)
        student_logits = None
        for n in range(self.iterations):
            if n > 0:
                predictions = argmax_ids(student_logits.detach()) if argmaxes is None else argmaxes[n - 1][0]
                prev = shift_predictions(prev, predictions, self.padding_idx, self.pad_replacement)
            if argmaxes is None:
                student_logits = model.decoder(prev, encoder_out=encoder_out)[0]
                yield prev, student_logits, teacher.decoder_distribution(prev, teacher_encoder_outs)
            else:  # nothing of the pass stays referenced here while the caller uses (and frees) it
                yield prev, model.decoder(prev, encoder_out=encoder_out)[0], teacher.decoder_distribution(
                    prev, teacher_encoder_outs)

    def teacher_cache_error(self, manifest):
        if self.iterations > 1:
            return ("tie_kd's passes after the first re-run the teacher on the student's own prefixes, which "
                    "no cache holds: pass --teacher-path, or --tie-iterations 1")
        if self.topk > manifest["k"]:
            return f"--tie-topk {self.topk} exceeds the cache's k = {manifest['k']}: rebuild it with --k {self.topk}"
        return None

    def forward(self, model, sample, reduce=True, teacher=None, backward=None, reference=True):
        """``backward`` (from the task in training): each pass's loss is backpropagated when formed;
        ``reference=False`` (source-only rows): the KL + ranking term alone."""
        if teacher is None:
            return self.gold_forward(model, sample)
        alpha = self.mix_alpha(reference)
        step, options = losses.PassBackward(backward), dict(topk=self.topk, ranking=self.ranking,
                                                            log_epsilon=self.log_epsilon)
        if self.iterations == 1:  # the gold pass alone, from either teacher (a cached one's KL on its buckets)
            distribution = self.teacher_distribution(sample, teacher)
            student_logits, target = self.student_forward(model, sample)
            kl, rank, ls_loss, nll_loss, ids = losses.tie_kd_iteration(
                student_logits, distribution, target, self.padding_idx, self.eps, **options)
            return self.finish(sample, target, ls_loss, nll_loss, [kl], [rank], [ids], alpha, step)
        target, pad, n = sample["target"], self.padding_idx, 0
        kl_sums, rank_sums, argmaxes = [], [], []  # argmaxes: per pass, computed once
        passes = self.decoding_passes(model, sample["net_input"], teacher, argmaxes, step.shared)
        for _, student_logits, distribution in passes:  # no enumerate: it would hold the last pass's tensors
            n += 1
            kl, rank, ls, nll, ids = losses.tie_kd_iteration(
                student_logits, distribution, target, pad, self.eps if n == 1 else None, **options)
            del student_logits, distribution  # read no more (backward reuses the teacher's storage)
            kl, rank, ls, nll = step(lambda: losses.tie_kd_pass_loss(kl, rank, alpha, self.iterations, ls),
                                     kl, rank, ls, nll)  # ls, nll: on the gold pass only
            ls_loss, nll_loss = (ls, nll) if n == 1 else (ls_loss, nll_loss)
            kl_sums.append(kl)
            rank_sums.append(rank)
            argmaxes.append(ids)
        return self.finish(sample, target, ls_loss, nll_loss, kl_sums, rank_sums, argmaxes, alpha, step)

    def finish(self, sample, target, ls_loss, nll_loss, kl_sums, rank_sums, argmaxes, alpha, step=None):
        """The summed loss and the logging output; ``argmaxes``: per pass, the (student, teacher) argmaxes."""
        pad = self.padding_idx
        loss, kd_loss, rank_loss = losses.tie_kd_loss(ls_loss, kl_sums, rank_sums, alpha)
        loss = step.finish(loss) if step is not None else loss

        logging_output = self.base_logging_output(sample, loss, nll_loss)
        logging_output["kd_loss"] = kd_loss.data
        if rank_loss is not None:
            logging_output["rank_loss"] = rank_loss.data
        agreements = [agreement_from_ids(*ids, target, pad) for ids in argmaxes]  # tensors: no sync
        logging_output.update(kd_agree=agreements[0], kd_tokens=target.ne(pad).sum())  # gold prefixes
        for n, count in enumerate(agreements if self.iterations > 1 else [], start=1):
            logging_output[f"{self.iteration_agree_prefix}{n}"] = count
        return loss, self.sample_size(sample), logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        tokens = sum(log.get("kd_tokens", 0) for log in logging_outputs)
        keys = {k for log in logging_outputs for k in log if k.startswith(cls.iteration_agree_prefix)}
        if tokens > 0:
            for key in sorted(keys, key=lambda k: int(k[len(cls.iteration_agree_prefix):])):
                n = key[len(cls.iteration_agree_prefix):]
                count = sum(log.get(key, 0) for log in logging_outputs)
                metrics.log_scalar(f"kd_top1_agree_iter{n}", count / tokens, tokens, round=4)
