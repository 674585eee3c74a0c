"""Pure loss functions for knowledge distillation of sequence models.

Everything here is torch only (no fairseq import) so that it can be tested,
differentiated and reused by every criterion of the plugin.  The functions
live in one module per method family and are all re-exported here, so
``from fairseq_kd.losses import X`` and ``fairseq_kd.losses.X`` work for each:

=====================  =======================================================
module                 owns
=====================  =======================================================
``common``             softmaxes, pad mask, label-smoothed NLL (summed, per
                       position, its floor), the KD mix (:func:`kd_mix`),
                       ``log_mean_exp``, top-1 agreement
``teacher``            :class:`TeacherDistribution`, the one form every KD
                       objective reads the teacher in: :class:`DenseTeacher`
                       (live, ensemble), :class:`TopKTeacher` (the cache)
``topk``               the cache's ``k + 1`` buckets (teacher, student, gold)
``chunked``            the chunked per-position reductions every divergence
                       is computed with (``pair_divergence``, ``chunked_rows``)
``divergences``        KL, reverse KL, skew KL / skew reverse KL, generalized
                       JSD (:data:`DIVERGENCES`), Word-KD's :func:`word_kd_loss`
``ranking``            TIE-KD: floored KL, hierarchical ranking loss, the
                       per-iteration terms, their combination, next prefix
``self_evolution``     Self-Evolution KD: hard tokens, mixing ratios, proxy
                       divergence, :func:`self_evolution_kd_loss`
``gate``               hybrid gated KD: gated mixture, gate objective and
                       equilibrium
``selection``          Selective KD: hard-token selection, pre-0.10 label
                       smoothing
``passes``             :class:`PassBackward`: a loss summed over decoder
                       passes, backpropagated one pass at a time
``block_max``          argmax and top-k ids over the vocabulary through block
                       maxima (exact, several times faster than torch's)
=====================  =======================================================

Conventions (those of fairseq's criterions):

* ``student_logits`` and ``teacher_logits`` are ``[B, T, V]`` scores before the
  softmax; ``target`` is ``[B, T]`` token ids, right-padded with ``padding_idx``.
* Every loss is a **sum** over the non-pad target positions (EOS included);
  the trainer divides by ``sample_size`` (the number of target tokens).
* Softmaxes are taken in float32 when the input is half or bfloat16 (as
  fairseq's ``utils.log_softmax`` does under ``--fp16``).
* A teacher "logit" may equally be a log-probability (for instance the
  log-space average of an ensemble): ``log_softmax`` of a log-distribution is
  the distribution itself, so every function accepts either.
"""

from fairseq_kd.losses.block_max import argmax_ids, topk_ids
from fairseq_kd.losses.common import (
    kd_mix,
    kd_scale,
    label_smoothed_nll,
    label_smoothed_nll_from_logits,
    label_smoothed_nll_per_position,
    label_smoothing_floor,
    log_mean_exp,
    log_probs,
    nll_from_log_probs,
    non_pad_mask,
    probs,
    top1_agreement,
)
from fairseq_kd.losses.divergences import (
    DIVERGENCES,
    divergence_from_log_probs,
    jsd_from_log_probs,
    kl_divergence,
    kl_from_log_probs,
    reverse_kl_from_log_probs,
    skew_kl_from_log_probs,
    word_kd_loss,
)
from fairseq_kd.losses.gate import (
    bernoulli_kl_from_logits,
    gate_equilibrium,
    gate_objective,
    gated_mixture,
)
from fairseq_kd.losses.passes import PassBackward
from fairseq_kd.losses.ranking import (
    TIE_KD_LOG_EPSILON,
    floored_kl_from_probs,
    hierarchical_ranking,
    hierarchical_ranking_from_probs,
    next_prefix,
    tie_kd_iteration,
    tie_kd_kl,
    tie_kd_loss,
    tie_kd_pass_loss,
    tie_kd_terms,
)
from fairseq_kd.losses.selection import (
    legacy_label_smoothed_nll,
    legacy_nll_from_log_probs,
    select_hard_tokens,
    selection_threshold,
)
from fairseq_kd.losses.self_evolution import (
    SEKD_DIVERGENCES,
    SEKD_HARD_CRITERIA,
    SEKD_LAMBDA_MODES,
    SEKD_PRIOR_SIDES,
    SEKDTerms,
    gold_teacher_log_mixture,
    log_convex_mixture,
    sekd_divergence,
    sekd_hard_mask,
    sekd_ratios,
    self_evolution_kd,
    self_evolution_kd_loss,
)
from fairseq_kd.losses.teacher import DenseTeacher, TeacherDistribution, TopKTeacher
from fairseq_kd.losses.topk import bucket_target, student_buckets, teacher_buckets, topk_with_tail

__all__ = [
    "argmax_ids", "topk_ids",
    # common
    "log_probs", "probs", "non_pad_mask", "nll_from_log_probs", "label_smoothed_nll",
    "label_smoothed_nll_per_position", "label_smoothed_nll_from_logits", "label_smoothing_floor", "kd_mix",
    "kd_scale", "log_mean_exp", "top1_agreement",
    # divergences
    "DIVERGENCES", "kl_from_log_probs", "kl_divergence", "word_kd_loss", "reverse_kl_from_log_probs",
    "skew_kl_from_log_probs", "jsd_from_log_probs", "divergence_from_log_probs",
    # the teacher's distribution and the cache's buckets
    "TeacherDistribution", "DenseTeacher", "TopKTeacher", "bucket_target", "student_buckets", "teacher_buckets",
    "topk_with_tail",
    # ranking
    "TIE_KD_LOG_EPSILON", "floored_kl_from_probs", "tie_kd_kl", "hierarchical_ranking_from_probs",
    "hierarchical_ranking", "tie_kd_terms", "tie_kd_iteration", "tie_kd_loss", "tie_kd_pass_loss", "next_prefix",
    # self_evolution
    "SEKD_HARD_CRITERIA", "SEKD_LAMBDA_MODES", "SEKD_DIVERGENCES", "SEKD_PRIOR_SIDES", "SEKDTerms",
    "gold_teacher_log_mixture", "log_convex_mixture", "sekd_hard_mask", "sekd_ratios", "sekd_divergence",
    "self_evolution_kd", "self_evolution_kd_loss",
    # gate
    "gated_mixture", "bernoulli_kl_from_logits", "gate_objective", "gate_equilibrium",
    # selection
    "legacy_label_smoothed_nll", "legacy_nll_from_log_probs", "selection_threshold", "select_hard_tokens",
    # passes
    "PassBackward",
]
