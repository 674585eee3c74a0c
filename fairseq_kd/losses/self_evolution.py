"""Self-Evolution KD (Song, Ding, Zan, Huang, COLING 2025, arXiv 2412.15303).

No official code and no readable method section: this is the reconstruction
of methods.md section 3.1, with every alternative reading behind an argument.
Stage 1 (no gradient) scores each token's difficulty against a gold (+)
teacher prior and picks the hard tokens and their mixing ratios
(:func:`sekd_hard_mask`, :func:`sekd_ratios`); stage 2 is the divergence to
the resulting proxy (:func:`sekd_divergence`); :func:`self_evolution_kd` and
:func:`self_evolution_kd_loss` put them together.

Memory: the difficulty is computed from the per-position ``KL(p_t || p_s)``
and the gold entries alone (:func:`sekd_difficulty`, no prior tensor), and
the prior and the proxy are built chunk by chunk on the positions whose
mixing ratio is non-zero only (:func:`~fairseq_kd.losses.chunked.chunked_rows`);
every other position gets the plain divergence.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fairseq_kd.losses.chunked import _chunks, _pair_rows, chunk_rows, chunked_rows, pair_divergence
from fairseq_kd.losses.common import _xlogy_ratio, kd_mix, kd_scale, log_probs, nll_from_log_probs, non_pad_mask
from fairseq_kd.losses.divergences import kl_from_log_probs


SEKD_HARD_CRITERIA = ("threshold", "ratio", "all")

SEKD_LAMBDA_MODES = ("const", "linear")

SEKD_DIVERGENCES = ("fkl", "rkl")

SEKD_PRIOR_SIDES = ("student", "target")


class SEKDTerms(NamedTuple):
    """Sums over the non-pad positions of one batch."""

    kd_loss: Tensor  #: the distillation term (differentiable)
    n_hard: Tensor  #: number of hard tokens (integer)
    difficulty_sum: Tensor  #: sum of the difficulties d_t (no grad)
    ratio_sum: Tensor  #: sum of the mixing ratios lambda_t (no grad)


def gold_teacher_log_mixture(teacher_lprobs: Tensor, target: Tensor, gt_weight: float) -> Tensor:
    """``log r`` with ``r = gt_weight * e_y + (1 - gt_weight) * p_t`` (``[B, T, V]``).

    ``e_y`` is the one-hot gold vector, so only the gold entry needs a
    ``logaddexp``; elsewhere ``log r = log(1 - gt_weight) + log p_t``.  At
    ``gt_weight = 1`` the non-gold entries are exactly ``-inf`` (``r = e_y``).
    """
    if not 0.0 <= gt_weight <= 1.0:
        raise ValueError(f"gt_weight must be in [0, 1], got {gt_weight}")
    if gt_weight == 0.0:
        return teacher_lprobs
    index = target.unsqueeze(-1)
    if gt_weight == 1.0:
        return torch.full_like(teacher_lprobs, float("-inf")).scatter(-1, index, 0.0)
    rest = teacher_lprobs + math.log1p(-gt_weight)
    gold = torch.logaddexp(rest.gather(-1, index), torch.full_like(rest[..., :1], math.log(gt_weight)))
    return rest.scatter(-1, index, gold)


def log_convex_mixture(log_a: Tensor, log_b: Tensor, weight: Tensor) -> Tensor:
    """``log((1 - w) * a + w * b)`` per position, ``w = weight`` (``[B, T]``, in [0, 1)).

    Where ``w = 0`` the result is ``log_a`` itself: the mixing branch is fed a
    dummy weight there, so neither ``log 0`` nor its gradient ever appears.
    Gradients flow into both ``log_a`` and ``log_b``.
    """
    active = weight > 0
    safe = torch.where(active, weight, torch.full_like(weight, 0.5)).unsqueeze(-1)
    mixed = torch.logaddexp(log_a + torch.log1p(-safe), log_b + torch.log(safe))
    return torch.where(active.unsqueeze(-1), mixed, log_a)


def sekd_hard_mask(
    difficulty: Tensor,
    mask: Tensor,
    criterion: str = "ratio",
    threshold: float = 1.0,
    hard_ratio: float = 0.5,
) -> Tensor:
    """Which non-pad positions are *hard* (``[B, T]`` bool, False on pads).

    * ``threshold``: ``d_t > threshold`` (strict);
    * ``ratio``: the ``k = ceil(hard_ratio * N)`` most difficult of the ``N``
      non-pad positions of the batch; as in Selective-KD's ``batch_level``,
      the gate is the k-th largest difficulty and ties with it are included
      (``d_t >= gate``), so ``k`` is a lower bound; ``hard_ratio = 0`` selects
      nothing;
    * ``all``: every non-pad position (spec alternative 3: a continuous ratio
      over all tokens, best combined with the ``linear`` lambda mode).
    """
    if criterion == "threshold":
        return (difficulty > threshold) & mask
    if criterion == "all":
        return mask.clone()
    if criterion != "ratio":
        raise ValueError(f"unknown hard-token criterion {criterion!r}; use one of {SEKD_HARD_CRITERIA}")
    if not 0.0 <= hard_ratio <= 1.0:
        raise ValueError(f"hard_ratio must be in [0, 1], got {hard_ratio}")
    values = difficulty[mask]
    # the 1e-9 keeps 0.3 * 10 = 3.0000000000000004 from rounding up to 4
    k = min(values.numel(), math.ceil(hard_ratio * values.numel() - 1e-9))
    if k <= 0:
        return torch.zeros_like(mask)
    gate = values.topk(k).values[-1]
    return (difficulty >= gate) & mask


def sekd_ratios(
    difficulty: Tensor, hard: Tensor, lam: float = 0.5, mode: str = "const", lambda_max: float = 0.9
) -> Tensor:
    """``lambda_t = hard_t * clip(g(d_t), 0, lambda_max)`` (``[B, T]``) with

    * ``const``:  ``g(d) = lam``;
    * ``linear``: ``g(d) = lam * d`` -- ``lam`` is then a slope in 1/nat (a
      hard token of difficulty 1 nat gets ``lam``, the ratio grows with the
      difficulty until it saturates at ``lambda_max``).  This choice needs no
      batch statistics, so a token's ratio does not depend on its batch mates.

    ``lambda_max < 1`` keeps part of the student in the proxy: at
    ``lambda_t = 1`` a token would give the student no gradient and, with
    ``gt_weight = 1``, an infinite KL.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not 0.0 <= lambda_max < 1.0:
        raise ValueError(f"lambda_max must be in [0, 1), got {lambda_max}")
    if mode == "const":
        ratio = torch.full_like(difficulty, min(lam, lambda_max))
    elif mode == "linear":
        ratio = (lam * difficulty).clamp(0.0, lambda_max)
    else:
        raise ValueError(f"unknown lambda mode {mode!r}; use one of {SEKD_LAMBDA_MODES}")
    return ratio.masked_fill(~hard, 0.0)


def sekd_divergence(
    student_lprobs: Tensor,
    teacher_lprobs: Tensor,
    target: Tensor,
    ratio: Tensor,
    mask: Tensor,
    gt_weight: float = 0.5,
    divergence: str = "fkl",
    prior_side: str = "student",
) -> Tensor:
    """Stage 2 for given ratios: the per-position divergence ``[B, T]`` (zero on pads).

    ``ratio`` (``lambda_t``) is treated as a constant; gradients flow into
    ``student_lprobs`` only.  With ``r_t = g * e_y + (1 - g) * p_t``:

    ============  =======  ==========================================================
    prior_side    div.     per-position term
    ============  =======  ==========================================================
    ``student``   ``fkl``  ``KL(p_t || q_t)``, ``q_t = (1 - lambda_t) p_s + lambda_t r_t``
    ``student``   ``rkl``  ``KL(q_t || p_t)``
    ``target``    ``fkl``  ``KL(qbar_t || p_s)``, ``qbar_t = (1 - lambda_t) p_t + lambda_t e_y``
    ``target``    ``rkl``  ``KL(p_s || qbar_t)``
    ============  =======  ==========================================================

    Where ``lambda_t = 0`` every row is the plain (forward or reverse) KL
    between teacher and student.  The reverse reading keeps the proxy as the
    student's stand-in and swaps the arguments: ``KL(q_t || p_t)`` reduces on
    easy tokens to the usual reverse KD ``KL(p_s || p_t)`` (methods.md 6.2),
    exactly as the forward reading reduces to Word-KD, whereas e.g.
    ``KL(p_s || q_t)`` would compare the student with a mixture of itself
    and lose that anchor.
    """
    rows_fn = _sekd_rows(gt_weight, divergence, prior_side)
    return chunked_rows(rows_fn, (student_lprobs, teacher_lprobs.detach(), target, ratio.detach()), mask)


def _sekd_rows(gt_weight: float, divergence: str, prior_side: str):
    """The per-position stage-2 term of :func:`sekd_divergence` on one chunk of
    positions (``[n, V]`` log-probs, ``[n]`` gold ids and ratios)."""
    if divergence not in SEKD_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {SEKD_DIVERGENCES}")
    if prior_side not in SEKD_PRIOR_SIDES:
        raise ValueError(f"unknown prior side {prior_side!r}; use one of {SEKD_PRIOR_SIDES}")
    forward = divergence == "fkl"

    def rows(student_lprobs, teacher_lprobs, target, ratio):
        if prior_side == "student":
            prior = gold_teacher_log_mixture(teacher_lprobs, target, gt_weight)
            proxy = log_convex_mixture(student_lprobs, prior, ratio)
            return _xlogy_ratio(teacher_lprobs, proxy) if forward else _xlogy_ratio(proxy, teacher_lprobs)
        gold = gold_teacher_log_mixture(teacher_lprobs, target, 1.0)
        smoothed = log_convex_mixture(teacher_lprobs, gold, ratio)
        return _xlogy_ratio(smoothed, student_lprobs) if forward else _xlogy_ratio(student_lprobs, smoothed)

    return rows


class _ProxyKL(torch.autograd.Function):
    """Default reading, ``KL(p_t || q_t)`` per row of ``[N, V]`` inputs: the plain KL
    where ``lambda_t = 0`` and the proxy of ``rows_fn`` on the sorted ``rows``.
    Backward builds the student's gradient chunk by chunk in the teacher's storage."""

    @staticmethod
    def forward(ctx, student, teacher, target, ratio, mask, rows, rows_fn, chunk):
        n = student.size(0)
        out = student.new_zeros(n)
        for sel in _chunks(n, chunk, None):
            out[sel] = _pair_rows("kl", teacher[sel], student[sel], 0.0)
        for idx in _chunks(n, chunk, rows):
            out[idx] = rows_fn(student[idx], teacher[idx], target[idx], ratio[idx])
        out.masked_fill_(~mask, 0.0)
        starts = torch.tensor(list(range(0, n, chunk)) + [n], device=rows.device)
        ctx.bounds = torch.searchsorted(rows, starts).tolist()
        ctx.rows_fn, ctx.chunk = rows_fn, chunk
        ctx.save_for_backward(student, teacher, target, ratio, mask, rows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, target, ratio, mask, rows = ctx.saved_tensors
        grad_out = grad_out.masked_fill(~mask, 0.0)
        for k, sel in enumerate(_chunks(student.size(0), ctx.chunk, None)):
            idx = rows[ctx.bounds[k]:ctx.bounds[k + 1]]
            if idx.numel() > 0:  # the proxy rows of this chunk, before their teacher rows are overwritten
                inputs = student[idx].detach().requires_grad_(True)
                with torch.enable_grad():
                    values = ctx.rows_fn(inputs, teacher[idx], target[idx], ratio[idx])
                (proxy_grad,) = torch.autograd.grad(values, inputs, grad_out[idx])
            block = teacher[sel]
            block.exp_().mul_(grad_out[sel].unsqueeze(-1)).neg_()  # d KL(p_t || p_s) / d log p_s
            block.masked_fill_(~mask[sel].unsqueeze(-1), 0.0)
            if idx.numel() > 0:
                teacher[idx] = proxy_grad
        return teacher, None, None, None, None, None, None, None


@torch.no_grad()
def sekd_difficulty(
    kl_teacher_student: Tensor, student_lprobs: Tensor, teacher_lprobs: Tensor, target: Tensor, mask: Tensor,
    gt_weight: float,
) -> Tensor:
    """Stage 1's ``d_t = KL(r_t || sg(p_s))`` (``[B, T]``, zero on pads, clamped at 0)
    from ``kl_teacher_student = KL(p_t || p_s)`` per position and the gold entries only.

    With ``g = gt_weight``, ``r_v = (1 - g) p_t(v)`` off the gold ``y`` and
    ``r_y = g + (1 - g) p_t(y)``, the sum over ``v != y`` is that of the
    teacher's KL scaled by ``1 - g`` and shifted by ``log(1 - g)``::

        d = (1 - g) [KL(p_t || p_s) - p_t(y) (log p_t(y) - log p_s(y)) + (1 - p_t(y)) log(1 - g)]
            + r_y (log r_y - log p_s(y))

    so the prior ``r_t`` is never built (``g = 1``: ``d = -log p_s(y)``; ``g = 0``: the KL)."""
    if not 0.0 <= gt_weight <= 1.0:
        raise ValueError(f"gt_weight must be in [0, 1], got {gt_weight}")
    index = target.unsqueeze(-1)
    student_gold = student_lprobs.detach().gather(-1, index).squeeze(-1)
    if gt_weight == 0.0:
        difficulty = kl_teacher_student.detach()
    elif gt_weight == 1.0:
        difficulty = -student_gold
    else:
        teacher_gold = teacher_lprobs.gather(-1, index).squeeze(-1)
        p_gold = teacher_gold.exp()
        log_rest = math.log1p(-gt_weight)
        log_r_gold = torch.logaddexp(teacher_gold + log_rest, torch.full_like(teacher_gold, math.log(gt_weight)))
        gold_term = (p_gold * (teacher_gold - student_gold)).nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
        difficulty = (1.0 - gt_weight) * (kl_teacher_student.detach() - gold_term + (1.0 - p_gold) * log_rest)
        difficulty = difficulty + log_r_gold.exp() * (log_r_gold - student_gold)
    return difficulty.masked_fill(~mask, 0.0).clamp_min(0.0)


def self_evolution_kd(
    student_logits: Tensor,
    teacher,
    target: Tensor,
    padding_idx: int,
    gt_weight: float = 0.5,
    hard_criterion: str = "ratio",
    threshold: float = 1.0,
    hard_ratio: float = 0.5,
    lam: float = 0.5,
    lambda_mode: str = "const",
    lambda_max: float = 0.9,
    divergence: str = "fkl",
    prior_side: str = "student",
    temperature: float = 1.0,
    student_lprobs: Optional[Tensor] = None,
    release_teacher: bool = False,
) -> SEKDTerms:
    """Self-Evolution KD term (reconstruction of methods.md 3.1) and its statistics.

    Per non-pad position, with ``p_s``, ``p_t`` softened by ``temperature`` (float32 for half inputs) and
    ``e_y`` the one-hot gold, all on the support of ``teacher`` (a
    :class:`~fairseq_kd.losses.teacher.TeacherDistribution`: the vocabulary, or the cache's ``k + 1``
    buckets with the gold token's bucket as ``y``)::

        r_t      = gt_weight * e_y + (1 - gt_weight) * p_t      # GT (+) teacher     (stage 1, no gradient)
        d_t      = KL(r_t || sg(p_s))                           # difficulty
        hard_t   = d_t > threshold | top hard_ratio of the batch | every token
        lambda_t = hard_t * clip(lam or lam * d_t, 0, lambda_max)

    Stage 2: :func:`sekd_divergence`; the default (``prior_side='student'``, ``divergence='fkl'``) is
    ``KL(p_t || (1 - lambda_t) p_s + lambda_t r_t)``.  Why that reading, and the spec's alternatives 1-3
    (``prior_side='target'``, the reverse direction, ``hard_criterion='all'``): docs/self_evolution_kd.md.

    ``student_lprobs`` may pass an already computed ``log_probs(student_logits, temperature)``;
    ``release_teacher`` lets backward build the student's gradient in the teacher's storage (default
    reading).  The statistics are tensors (no device sync).  Returns sums over the non-pad positions; with
    every ``lambda_t = 0`` ``kd_loss`` equals the plain KL (``fkl``) bit for bit.
    """
    rows_fn = _sekd_rows(gt_weight, divergence, prior_side)
    mask = non_pad_mask(target, padding_idx)
    if student_lprobs is None:
        student_lprobs = log_probs(student_logits, temperature)
    student_lprobs, teacher_lprobs = teacher.align(student_lprobs, temperature)
    teacher_lprobs, target = teacher_lprobs.detach(), teacher.gold(target)
    # KL(p_t || p_s): the plain term of the default reading (differentiable) and stage 1's input
    plain_fkl = prior_side == "student" and divergence == "fkl"
    fused = (plain_fkl and release_teacher and teacher.releasable and torch.is_grad_enabled()
             and student_lprobs.requires_grad)
    with torch.set_grad_enabled(torch.is_grad_enabled() and plain_fkl and not fused):
        kl = kl_from_log_probs(student_lprobs if plain_fkl else student_lprobs.detach(), teacher_lprobs, mask)
    difficulty = sekd_difficulty(kl, student_lprobs, teacher_lprobs, target, mask, gt_weight)
    with torch.no_grad():
        hard = sekd_hard_mask(difficulty, mask, hard_criterion, threshold, hard_ratio)
        ratio = sekd_ratios(difficulty, hard, lam, lambda_mode, lambda_max)
    mixed = ratio > 0
    if plain_fkl:
        plain = kl
    elif divergence == "fkl":  # target side, KL(p_t || p_s) where lambda_t = 0
        plain = pair_divergence(teacher_lprobs, student_lprobs, mask & ~mixed, "kl")
    else:  # KL(p_s || p_t) where lambda_t = 0
        plain = pair_divergence(student_lprobs, teacher_lprobs, mask & ~mixed, "kl")
    rows = mixed.reshape(-1).nonzero().squeeze(1)
    if fused:
        flat = [x.reshape(-1, *x.shape[mask.dim():]) for x in (student_lprobs, teacher_lprobs, target, ratio, mask)]
        kd = _ProxyKL.apply(*flat, rows, rows_fn, chunk_rows(student_lprobs.size(-1))).view(mask.shape)
    elif rows.numel() > 0:
        proxy = chunked_rows(rows_fn, (student_lprobs, teacher_lprobs, target, ratio), mask, rows=rows)
        kd = torch.where(mixed, proxy, plain)
    else:
        kd = plain
    return SEKDTerms(kd.sum(), hard.sum(), difficulty.sum(), ratio.sum())


def self_evolution_kd_loss(
    student_logits: Tensor,
    teacher,
    target: Tensor,
    padding_idx: int,
    epsilon: float,
    alpha: float,
    temperature: float = 1.0,
    temperature_scale: bool = True,
    nll_weight: float = 0.0,
    release_teacher: bool = False,
    **sekd_options,
):
    """``(1 - alpha) * LS-NLL + alpha * s * L_SEKD + nll_weight * NLL``.

    The combination is :func:`~fairseq_kd.losses.divergences.word_kd_loss`'s with the KL replaced by the
    Self-Evolution term, so with every ratio at zero and ``nll_weight = 0`` the two losses are equal.  The
    optional extra term is the plain (unsmoothed, ``tau = 1``) gold NLL of the spec's
    ``L = L_KD + beta * L_NLL``; ``alpha = 1, nll_weight = beta`` gives that form exactly.  ``sekd_options``
    are the keyword arguments of :func:`self_evolution_kd`.  Returns ``(loss, nll_loss, terms)``;
    ``terms`` is a :class:`SEKDTerms` (``None`` without a teacher, in which case ``loss`` is the plain
    LS-NLL).
    """
    student_lprobs = log_probs(student_logits)
    ls_loss, nll_loss = nll_from_log_probs(student_lprobs, target, padding_idx, epsilon)
    if teacher is None:
        return ls_loss, nll_loss, None
    soft = student_lprobs if temperature == 1.0 else None
    terms = self_evolution_kd(student_logits, teacher, target, padding_idx, temperature=temperature,
                              student_lprobs=soft, release_teacher=release_teacher, **sekd_options)
    loss = kd_mix(ls_loss, terms.kd_loss, alpha, kd_scale(temperature, temperature_scale))
    if nll_weight != 0.0:
        loss = loss + nll_weight * nll_loss
    return loss, nll_loss, terms
