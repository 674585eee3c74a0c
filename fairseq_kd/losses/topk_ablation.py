"""The TIE-KD paper's top-1 ablations of Word-KD (Zhang et al., ACL 2023, §3).

The paper argues that the knowledge word-level KD transfers lives mostly in the
teacher's top-1 prediction, with two ablations of the teacher distribution,
both shipped as analysis criterions of its official code (NMT-KD ``53c2244``):

``no-top1`` (``kd_wo_top1info``)
    the teacher's largest probability is moved onto the *gold* token
    (scatter 0 at the argmax, scatter-add the max probability at the gold id);
    when the argmax already is the gold token the distribution is unchanged.
    The student is then distilled towards this distribution with the chosen
    divergence.  The teacher keeps the shape of its tail but no longer says
    which token it ranks first.
``top1-only`` (``kd_wo_corrinfo``)
    ``-sum_m max(p_t) * log p_s(argmax p_t)``: a hard top-1 label weighted by
    the teacher's confidence, without the rest of its distribution.
``all``
    the unchanged Word-KD of :func:`fairseq_kd.losses.word_kd_loss`.

Both terms use the same temperature convention as Word-KD (``tau`` on both
sides, the term times ``tau^2`` when ``temperature_scale``) and the same
combination ``(1 - alpha) * LS-NLL + alpha * term``.  Torch only.
"""

from torch import Tensor

from fairseq_kd.losses.common import kd_mix, kd_scale, log_probs, nll_from_log_probs, non_pad_mask
from fairseq_kd.losses.divergences import word_kd_loss
from fairseq_kd.losses.teacher import DenseTeacher

#: ``--kd-topk-mode`` of ``word_kd``
TOPK_MODES = ("all", "no-top1", "top1-only")


def without_top1_log_probs(teacher_lprobs: Tensor, target: Tensor) -> Tensor:
    """Log of the teacher distribution with its top-1 probability moved onto the gold token.

    ``teacher_lprobs`` ``[B, T, V]`` normalised log-probabilities, ``target``
    ``[B, T]``.  Tokens left without mass get ``-inf`` (``0 * log 0 = 0`` in the
    divergences)."""
    p = teacher_lprobs.exp()
    top_p, top_id = p.max(dim=-1, keepdim=True)
    moved = p.scatter(-1, top_id, 0.0).scatter_add(-1, target.unsqueeze(-1), top_p)
    return moved.log()


def top1_only_per_position(student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-position ``-max(p_t) * log p_s(argmax p_t)`` ``[B, T]``, zero where ``mask`` is False."""
    top_lp, top_id = teacher_lprobs.max(dim=-1, keepdim=True)
    term = -(top_lp.exp() * student_lprobs.gather(-1, top_id)).squeeze(-1)
    return term.masked_fill(~mask, 0.0)


def word_kd_ablation_loss(
    student_logits: Tensor,
    teacher,
    target: Tensor,
    padding_idx: int,
    epsilon: float,
    alpha: float,
    temperature: float = 1.0,
    temperature_scale: bool = True,
    divergence: str = "kl",
    skew_lambda: float = 0.1,
    topk_mode: str = "all",
    jsd_beta: float = 0.5,
):
    """Word-KD with the teacher's top-1 ablated (``topk_mode``, :data:`TOPK_MODES`); ``teacher`` is a
    :class:`~fairseq_kd.losses.teacher.TeacherDistribution` over the whole vocabulary (a live one).

    Returns ``(loss, nll_loss, kd_loss)`` sums like :func:`word_kd_loss`
    (``kd_loss`` is the unscaled KD term, ``None`` without a teacher).
    ``top1-only`` defines its own term and accepts only ``divergence="kl"``."""
    if topk_mode not in TOPK_MODES:
        raise ValueError(f"unknown top-k mode {topk_mode!r}; use one of {TOPK_MODES}")
    options = dict(epsilon=epsilon, alpha=alpha, temperature=temperature, temperature_scale=temperature_scale)
    if topk_mode == "all" or teacher is None:
        return word_kd_loss(student_logits, teacher, target, padding_idx, divergence=divergence,
                            skew_lambda=skew_lambda, jsd_beta=jsd_beta, **options)
    teacher_lprobs = teacher.full_log_probs()
    if topk_mode == "no-top1":
        # log_softmax(log p_hat / tau) inside word_kd_loss is the tempered ablated distribution
        ablated = DenseTeacher.from_logits(without_top1_log_probs(teacher_lprobs, target))
        return word_kd_loss(student_logits, ablated, target, padding_idx, divergence=divergence,
                            skew_lambda=skew_lambda, jsd_beta=jsd_beta, **options)
    if divergence != "kl":
        raise ValueError("the top1-only ablation is a weighted hard label, not a divergence; use divergence 'kl'")
    student_lprobs = log_probs(student_logits)
    ls_loss, nll_loss = nll_from_log_probs(student_lprobs, target, padding_idx, epsilon)
    if temperature != 1.0:
        student_lprobs, teacher_lprobs = log_probs(student_logits, temperature), teacher.full_log_probs(temperature)
    kd_loss = top1_only_per_position(student_lprobs, teacher_lprobs, non_pad_mask(target, padding_idx)).sum()
    return kd_mix(ls_loss, kd_loss, alpha, kd_scale(temperature, temperature_scale)), nll_loss, kd_loss
