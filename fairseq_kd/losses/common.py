"""Shared helpers of the loss functions: softmaxes, the pad mask, the
label-smoothed NLL (summed and per position), its floor, the ``0 * log 0``
convention, the ensemble average in log space, the top-1 agreement, and the
chunked per-position reductions every divergence is computed with.

Memory: a divergence over ``[B, T, V]`` log-probabilities is computed in
chunks of target positions (``CHUNK_ELEMENTS`` elements each) by a
``torch.autograd.Function`` that saves only its inputs and rebuilds its
gradient chunk by chunk, so no full-size temporary outlives a chunk
(:func:`pair_divergence` with hand-written gradients for the KL and the
floored KL, :func:`chunked_rows` for any other per-position function, whose
backward recomputes the chunk under autograd).

Conventions (those of fairseq's criterions), followed by every module of
:mod:`fairseq_kd.losses`:

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

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last dimension, in at
    least float32 precision (half and bfloat16 inputs are upcast; float64
    stays float64, which ``gradcheck`` needs)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def probs(logits: Tensor) -> Tensor:
    """``softmax(logits)`` over the last dimension, float32 for half or bfloat16
    inputs and float64 for float64 inputs (the dtype rules of :func:`log_probs`)."""
    return log_probs(logits).exp()


def non_pad_mask(target: Tensor, padding_idx: int) -> Tensor:
    """``[B, T]`` boolean mask of the positions that count as targets."""
    return target.ne(padding_idx)


def nll_from_log_probs(
    lprobs: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """:func:`label_smoothed_nll` for already normalised float32 log-probabilities."""
    mask = non_pad_mask(target, padding_idx)
    nll = -lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    nll_sum = nll.masked_fill(~mask, 0.0).sum()
    if epsilon == 0.0:
        return nll_sum, nll_sum
    smooth_sum = (-lprobs.sum(dim=-1)).masked_fill(~mask, 0.0).sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_sum + eps_i * smooth_sum
    return loss, nll_sum


def label_smoothed_nll(
    student_logits: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """Label-smoothed negative log-likelihood, fairseq >= 0.10 formula.

    With ``eps_i = epsilon / (V - 1)``::

        loss = (1 - epsilon - eps_i) * sum_m nll + eps_i * sum_m (-sum_v log p_s(v))

    which puts ``1 - epsilon`` on the gold token and ``eps_i`` on every other
    token.  Returns ``(loss_sum, nll_sum)``, both summed over non-pad positions.
    """
    return nll_from_log_probs(log_probs(student_logits), target, padding_idx, epsilon)


def label_smoothed_nll_per_position(
    lprobs: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """Per-position ``(loss, nll)`` ``[B, T]`` of :func:`label_smoothed_nll`
    (zero on pads); their sums are the sums of :func:`nll_from_log_probs`."""
    mask = non_pad_mask(target, padding_idx)
    nll = (-lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)).masked_fill(~mask, 0.0)
    if epsilon == 0.0:
        return nll, nll
    smooth = (-lprobs.sum(dim=-1)).masked_fill(~mask, 0.0)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


class _LabelSmoothedNLLFromLogits(torch.autograd.Function):
    """:func:`label_smoothed_nll_per_position` of ``log_probs(logits)``, keeping only the log-probabilities,
    whose storage backward turns into the gradient w.r.t. the logits chunk by chunk (no other
    full-size tensor).  Each chunk's gradient is what autograd computes for the same expression, op for
    op: the log-probabilities' gradient (the gather's and the sum's, added), then torch's own
    log-softmax backward."""

    @staticmethod
    def forward(ctx, logits, target, padding_idx, epsilon):
        lprobs = log_probs(logits)
        ls, nll = label_smoothed_nll_per_position(lprobs, target, padding_idx, epsilon)
        nll = nll.clone() if nll is ls else nll  # epsilon 0: one tensor, but only ``ls`` is differentiable
        ctx.save_for_backward(lprobs, target)
        ctx.options = (padding_idx, epsilon, logits.dtype)
        ctx.mark_non_differentiable(nll)
        return ls, nll

    @staticmethod
    def backward(ctx, grad_ls, grad_nll):
        lprobs, target = ctx.saved_tensors
        padding_idx, epsilon, dtype = ctx.options
        vocab = lprobs.size(-1)
        eps_i = epsilon / (vocab - 1)
        keep = non_pad_mask(target, padding_idx).reshape(-1)
        grad_ls, target = grad_ls.reshape(-1), target.reshape(-1, 1)
        # the gradients autograd gives the log-probabilities: -c * g on the target, -eps_i * g everywhere
        on_target = -(grad_ls * (1.0 - epsilon - eps_i) if epsilon != 0.0 else grad_ls).masked_fill(~keep, 0.0)
        everywhere = -(grad_ls * eps_i).masked_fill(~keep, 0.0) if epsilon != 0.0 else None
        flat = _flat(lprobs)  # overwritten chunk by chunk: a second backward fails (the saved tensor changed)
        for sel in _chunks(flat.size(0), chunk_rows(vocab), None):
            out = flat[sel]
            if everywhere is None:
                grad = torch.zeros_like(out).scatter_add_(-1, target[sel], on_target[sel].unsqueeze(-1))
            else:
                grad = everywhere[sel].unsqueeze(-1).expand_as(out) + torch.zeros_like(out).scatter_add_(
                    -1, target[sel], on_target[sel].unsqueeze(-1))
            flat[sel] = torch._log_softmax_backward_data(grad, out, -1, out.dtype)
        return lprobs.to(dtype), None, None, None


def label_smoothed_nll_from_logits(
    logits: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """Per-position ``(loss, nll)`` ``[B, T]`` of :func:`label_smoothed_nll_per_position` on
    ``log_probs(logits)`` (the same values), differentiable in ``loss`` only: saves one
    ``[B, T, V]`` tensor, in whose storage backward builds the logits' gradient."""
    return _LabelSmoothedNLLFromLogits.apply(logits, target, padding_idx, epsilon)


def label_smoothing_floor(epsilon: float, vocab_size: int) -> float:
    """Smallest value of the per-token label-smoothed NLL (fairseq >= 0.10 formula).

    The loss is the cross-entropy ``CE(q, p_s)`` to the smoothed one-hot
    ``q`` (``1 - epsilon`` on the target, ``epsilon / (V - 1)`` elsewhere), so
    ``LS-NLL - floor = KL(q || p_s) >= 0`` with ``floor = H(q)``.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    floor = 0.0
    if 0.0 < epsilon < 1.0:
        floor -= (1.0 - epsilon) * math.log1p(-epsilon)
    if epsilon > 0.0:
        floor -= epsilon * math.log(epsilon / (vocab_size - 1))
    return floor


def _xlogy_ratio(p_log: Tensor, q_log: Tensor) -> Tensor:
    """Per-position ``sum_v p (log p - log q)`` with ``0 * log 0 = 0``.

    ``p * (log p - log q)`` is NaN exactly where ``p = 0`` (``0 * -inf`` or
    ``0 * nan``), so ``nan_to_num`` (keeping the infinities) is that
    convention without a comparison over the vocabulary."""
    pointwise = p_log.exp() * (p_log - q_log)
    return pointwise.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=-1)


# -- chunked per-position reductions ------------------------------------------------

#: elements of one chunk of ``[positions, V]`` temporaries (float32: 4 MiB)
CHUNK_ELEMENTS = 1 << 20


def chunk_rows(vocab_size: int) -> int:
    """Positions per chunk for a vocabulary of ``vocab_size`` (at least 1)."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _chunks(n_rows: int, chunk: int, rows: Optional[Tensor]):
    """Row selectors of the chunks: slices of ``range(n_rows)``, or slices of the index ``rows``."""
    if rows is None:
        for start in range(0, n_rows, chunk):
            yield slice(start, min(start + chunk, n_rows))
    else:
        for start in range(0, rows.numel(), chunk):
            yield rows[start:start + chunk]


def _pair_rows(kind: str, log_p: Tensor, log_q: Tensor, log_epsilon: float) -> Tensor:
    """Per-row divergence of one chunk (see :func:`pair_divergence`)."""
    p = log_p.exp()
    if kind == "floored":
        pointwise = p * (torch.log(p + log_epsilon) - torch.log(log_q.exp() + log_epsilon))
    else:
        pointwise = p * (log_p - log_q)
        if kind == "kl_finite":
            pointwise = pointwise.masked_fill_(torch.isinf(log_q) | (p == 0), 0.0)
        else:
            pointwise = pointwise.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return pointwise.sum(dim=-1)


def _pair_grads(kind, log_p, log_q, log_epsilon, g, need_p, need_q):
    """Gradients of one chunk's row sums times ``g`` ``[n, 1]`` w.r.t. ``log_p``, ``log_q``."""
    p = log_p.exp()
    grad_p = grad_q = None
    if kind == "floored":
        q = log_q.exp()
        if need_q:
            grad_q = -(p * q / (q + log_epsilon)) * g
        if need_p:
            grad_p = (p * (torch.log(p + log_epsilon) - torch.log(q + log_epsilon)) + p * p / (p + log_epsilon)) * g
        return grad_p, grad_q
    dead = torch.isinf(log_q) | (p == 0) if kind == "kl_finite" else None
    if need_q:
        grad_q = -p * g
        if dead is not None:
            grad_q.masked_fill_(dead, 0.0)
    if need_p:
        grad_p = p * (log_p - log_q + 1.0)
        if dead is not None:
            grad_p.masked_fill_(dead, 0.0)
        else:
            grad_p.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        grad_p.mul_(g)
    return grad_p, grad_q


def _pair_rows_into_p(kind: str, log_p: Tensor, log_q: Tensor, log_epsilon: float) -> Tensor:
    """:func:`_pair_rows` of one chunk that also turns ``log_p`` (a view, or a chunk-sized copy the
    caller writes back) into the factor of ``log_q``'s gradient, ``-grad / g``: ``p`` for the KL,
    ``p * q / (q + eps)`` for the floored form.  The values are :func:`_pair_rows`'s, op for op."""
    if kind == "floored":
        p = log_p.exp_()
        q = log_q.exp()
        q_eps = q + log_epsilon
        values = (p * (torch.log(p + log_epsilon) - torch.log(q_eps))).sum(dim=-1)
        p.mul_(q.div_(q_eps))
        return values
    difference = log_p - log_q
    p = log_p.exp_()
    return difference.mul_(p).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=-1)


class _PairDivergence(torch.autograd.Function):
    """Per-row ``sum_v f(log_p, log_q)`` of ``[..., V]`` inputs over their flattened ``[N, V]`` rows,
    chunk by chunk; zero outside ``mask`` (or outside the index ``rows``).  Saves only its inputs.
    The inputs are flattened here, not by the caller, so the gradients it returns are whole tensors
    (no views): autograd can then add the other gradients of ``log_q`` into them in place.

    With ``overwrite_p`` (see :func:`pair_divergence`) forward leaves in ``log_p``'s storage the
    factor of ``log_q``'s gradient (:func:`_pair_rows_into_p`; zero outside ``rows``), so
    backward is one multiplication by the incoming gradient in that same storage: no exponential
    is taken again and no full-size tensor is allocated."""

    @staticmethod
    def forward(ctx, log_p, log_q, mask, rows, kind, log_epsilon, chunk, overwrite_p=False):
        flat_p, flat_q = _flat(log_p), _flat(log_q)
        out = log_p.new_zeros(flat_p.size(0))
        with torch.no_grad():
            if overwrite_p and rows is not None:  # the rows that are not selected get no gradient
                keep = torch.zeros(flat_p.size(0), dtype=torch.bool, device=flat_p.device)
                keep[rows] = True
                flat_p.masked_fill_(~keep.unsqueeze(-1), 0.0)
            for sel in _chunks(flat_p.size(0), chunk, rows):
                if not overwrite_p:
                    out[sel] = _pair_rows(kind, flat_p[sel], flat_q[sel], log_epsilon)
                    continue
                block = flat_p[sel]  # a view for slices, a chunk-sized copy for an index
                out[sel] = _pair_rows_into_p(kind, block, flat_q[sel], log_epsilon)
                if rows is not None:
                    flat_p[sel] = block
            # rows outside ``mask`` keep a finite factor (in [0, 1]) that backward multiplies by 0
        if mask is not None:
            out.masked_fill_(~mask, 0.0)
        ctx.save_for_backward(log_p, log_q, mask, rows)
        ctx.options = (kind, log_epsilon, chunk, overwrite_p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        log_p, log_q, mask, rows = ctx.saved_tensors
        kind, log_epsilon, chunk, overwrite_p = ctx.options
        need_p, need_q = ctx.needs_input_grad[:2]
        if mask is not None:
            grad_out = grad_out.masked_fill(~mask, 0.0)
        if overwrite_p:  # log_p holds the gradient's factor: scaled in place (a second backward is refused)
            return None, log_p.mul_(grad_out.neg().view(*log_p.shape[:-1], 1)), None, None, None, None, None, None
        flat_p, flat_q = _flat(log_p), _flat(log_q)
        grad_p = torch.zeros_like(log_p, memory_format=torch.contiguous_format) if need_p else None
        grad_q = torch.zeros_like(log_q, memory_format=torch.contiguous_format) if need_q else None
        flat_grad_p = _flat(grad_p) if need_p else None
        flat_grad_q = _flat(grad_q) if need_q else None
        for sel in _chunks(flat_p.size(0), chunk, rows):
            gp, gq = _pair_grads(kind, flat_p[sel], flat_q[sel], log_epsilon, grad_out[sel].unsqueeze(-1), need_p, need_q)
            if mask is not None:
                keep = mask[sel].unsqueeze(-1)
                gp = gp.masked_fill_(~keep, 0.0) if gp is not None else None
                gq = gq.masked_fill_(~keep, 0.0) if gq is not None else None
            if need_p:
                flat_grad_p[sel] = gp
            if need_q:
                flat_grad_q[sel] = gq
        return grad_p, grad_q, None, None, None, None, None, None


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.size(-1))


def pair_divergence(
    log_p: Tensor, log_q: Tensor, mask: Tensor, kind: str = "kl", log_epsilon: float = 0.0,
    rows: Optional[Tensor] = None, overwrite_p: bool = False,
) -> Tensor:
    """Per-position divergence ``[B, T]`` (zero where ``mask`` is False) of two
    ``[B, T, V]`` log-distributions, in chunks of positions:

    * ``kl``: ``sum_v p (log p - log q)`` with ``0 * log 0 = 0`` (``KL(p || q)``);
    * ``kl_finite``: the same with the terms where ``q = 0`` dropped (DistiLLM's reverse KL);
    * ``floored``: ``sum_v p (log(p + eps) - log(q + eps))``, ``eps = log_epsilon`` (TIE-KD).

    ``rows`` (1-D indices into the flattened ``[B * T]`` positions, all inside
    ``mask``) restricts the work to those positions.  Values and gradients are
    those of the same expression under autograd, to float32 rounding; the
    gradient is built chunk by chunk in backward, so only the inputs are kept.

    ``overwrite_p`` (for a ``log_p`` without gradient that nothing reads after this
    call: the live teacher's log-probabilities) lets forward replace ``log_p`` by the
    factor of ``log_q``'s gradient and backward scale it in place, so the gradient
    costs one multiplication and no full-size allocation.  It takes effect only when
    a backward can follow (grad mode on, ``log_q`` requiring a gradient, ``log_p``
    not, ``log_p`` contiguous, the ``kl`` or ``floored`` kind); ``log_p`` then holds
    that factor from the return of this call on (read the teacher before it), and a
    second backward through the graph raises torch's in-place modification error.
    """
    if kind not in ("kl", "kl_finite", "floored"):
        raise ValueError(f"unknown pair divergence {kind!r}")
    flat_mask = mask.reshape(-1)
    overwrite_p = (overwrite_p and kind in ("kl", "floored") and torch.is_grad_enabled() and log_q.requires_grad
                   and not log_p.requires_grad and log_p.is_contiguous())
    out = _PairDivergence.apply(
        log_p, log_q, None if rows is not None else flat_mask, rows, kind, log_epsilon,
        chunk_rows(log_p.size(-1)), overwrite_p,
    )
    return out.view(mask.shape)


class _ChunkedRows(torch.autograd.Function):
    """``fn`` applied to chunks of rows of its inputs; backward recomputes each chunk under autograd."""

    @staticmethod
    def forward(ctx, fn, chunk, mask, rows, *tensors):
        n_rows = tensors[0].size(0)
        out = None
        with torch.no_grad():
            for sel in _chunks(n_rows, chunk, rows):
                values = fn(*(t[sel] for t in tensors))
                if out is None:
                    out = values.new_zeros(n_rows)
                out[sel] = values
        if out is None:
            out = tensors[0].new_zeros(n_rows)
        if mask is not None:
            out.masked_fill_(~mask, 0.0)
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(mask, rows, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mask, rows, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        grads = [torch.zeros_like(t) if need else None for t, need in zip(tensors, needs)]
        if mask is not None:
            grad_out = grad_out.masked_fill(~mask, 0.0)
        for sel in _chunks(tensors[0].size(0), ctx.chunk, rows):
            inputs = [t[sel].detach().requires_grad_(need) for t, need in zip(tensors, needs)]
            wanted = [x for x, need in zip(inputs, needs) if need]
            with torch.enable_grad():
                values = ctx.fn(*inputs)
            chunk_grads = iter(torch.autograd.grad(values, wanted, grad_out[sel], allow_unused=True))
            keep = None if mask is None else mask[sel]
            for i, need in enumerate(needs):
                if not need:
                    continue
                g = next(chunk_grads)
                if g is None:
                    continue
                if keep is not None:
                    g = g.masked_fill(~keep.view(-1, *([1] * (g.dim() - 1))), 0.0)
                grads[i][sel] = g
        return (None, None, None, None, *grads)


def chunked_rows(
    fn: Callable[..., Tensor], tensors: Sequence[Tensor], mask: Tensor, rows: Optional[Tensor] = None
) -> Tensor:
    """Per-position values ``[B, T]`` of ``fn`` applied chunk by chunk (zero where ``mask`` is False).

    ``tensors`` are ``[B, T, ...]`` (log-probabilities ``[B, T, V]``, per-position
    ``[B, T]`` values or ids); ``fn`` receives the same chunk of positions of
    each, flattened to ``[n, ...]``, and returns ``[n]``.  Backward recomputes
    each chunk under autograd (gradient checkpointing per chunk), so values
    and gradients equal those of ``fn`` on the whole batch, to float32 rounding,
    while no full-size temporary of ``fn`` is ever held.  ``rows`` restricts the
    work to those flattened positions (all inside ``mask``).
    """
    lead = mask.dim()
    flat = [t.reshape(-1, *t.shape[lead:]) for t in tensors]
    vocab = max((t.size(-1) for t in tensors if t.dim() > lead), default=1)
    out = _ChunkedRows.apply(fn, chunk_rows(vocab), None if rows is not None else mask.reshape(-1), rows, *flat)
    return out.view(mask.shape)


def log_mean_exp(stacked_lprobs: Tensor, dim: int = 0) -> Tensor:
    """``log(mean_i exp(x_i))`` along ``dim``: the probability average of an
    ensemble, computed in log space."""
    return torch.logsumexp(stacked_lprobs, dim=dim) - math.log(stacked_lprobs.size(dim))


def top1_agreement(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, padding_idx: int
) -> Tensor:
    """Number of non-pad positions where student and teacher have the same argmax."""
    return agreement_from_ids(student_logits.argmax(dim=-1), teacher_logits.argmax(dim=-1), target, padding_idx)


def agreement_from_ids(student_ids: Tensor, teacher_ids: Tensor, target: Tensor, padding_idx: int) -> Tensor:
    """:func:`top1_agreement` from already computed argmaxes ``[B, T]`` (a tensor: no device sync)."""
    return (student_ids.eq(teacher_ids) & non_pad_mask(target, padding_idx)).sum()


def teacher_log_probs(teacher: Tensor, temperature: float = 1.0, normalized: bool = False) -> Tensor:
    """The teacher's (tempered) log-probabilities: ``teacher`` itself when it already
    holds normalised log-probabilities (``normalized``, as the live teacher returns)
    and ``temperature == 1``, else :func:`log_probs` of it."""
    if normalized and temperature == 1.0:
        return teacher.float() if teacher.dtype in (torch.float16, torch.bfloat16) else teacher
    return log_probs(teacher, temperature)
