"""Chunked per-position reductions over ``[positions, V]`` tensors: every divergence of
:mod:`fairseq_kd.losses` is computed with them.

A divergence over ``[B, T, V]`` log-probabilities is computed in chunks of target
positions (``CHUNK_ELEMENTS`` elements each) by a ``torch.autograd.Function`` that
saves only its inputs and rebuilds its gradient chunk by chunk, so no full-size
temporary outlives a chunk: :func:`pair_divergence` with hand-written gradients for
the KL and the floored KL (optionally built in the teacher's own storage), and
:func:`chunked_rows` for any other per-position function, whose backward recomputes
the chunk under autograd.  Torch only.
"""

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

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


_RELEASED = "_fairseq_kd_released"


class ReleasedTensorError(RuntimeError):
    """A tensor whose storage a divergence took over (``overwrite_p``) was read again."""


def release(t: Tensor) -> None:
    """Mark ``t`` as holding a gradient factor, not its values: any later read by these functions fails."""
    setattr(t, _RELEASED, True)


def check_not_released(*tensors: Optional[Tensor]) -> None:
    """Refuse a tensor (or a view of one) marked by :func:`release`: its storage no longer holds its values."""
    for t in tensors:
        if t is None:
            continue
        if getattr(t, _RELEASED, False) or getattr(getattr(t, "_base", None), _RELEASED, False):
            raise ReleasedTensorError(
                "this tensor was released by a divergence computed with overwrite_p/release_teacher (its storage "
                "now holds a gradient factor): read the teacher's log-probabilities before that call, or pass "
                "release_teacher=False"
            )


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
    check_not_released(log_p, log_q)
    flat_mask = mask.reshape(-1)
    overwrite_p = (overwrite_p and kind in ("kl", "floored") and torch.is_grad_enabled() and log_q.requires_grad
                   and not log_p.requires_grad and log_p.is_contiguous())
    out = _PairDivergence.apply(
        log_p, log_q, None if rows is not None else flat_mask, rows, kind, log_epsilon,
        chunk_rows(log_p.size(-1)), overwrite_p,
    )
    if overwrite_p:
        release(log_p)
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
    check_not_released(*tensors)
    lead = mask.dim()
    flat = [t.reshape(-1, *t.shape[lead:]) for t in tensors]
    vocab = max((t.size(-1) for t in tensors if t.dim() > lead), default=1)
    out = _ChunkedRows.apply(fn, chunk_rows(vocab), None if rows is not None else mask.reshape(-1), rows, *flat)
    return out.view(mask.shape)



def _tail_rows(lprobs: Tensor, ids: Tensor) -> Tensor:
    """``logsumexp`` of one chunk's rows over the entries outside ``ids`` (those set to ``-inf`` in a copy)."""
    return lprobs.scatter(-1, ids, -math.inf).logsumexp(dim=-1)


#: the floor of a tail bucket's log-mass (exp(-80) ~ 1.8e-35, above float32's smallest normal): an empty
#: tail (ids covering the vocabulary) stays finite, so no divergence meets ``-inf - -inf``; below it the
#: tail receives no gradient
TAIL_FLOOR = -80.0


class _Buckets(torch.autograd.Function):
    """``[N, k + 1]``: rows of ``lprobs`` ``[N, V]`` at ``ids`` ``[N, k]``, then the log of their mass
    outside ``ids``, chunk by chunk.  Backward builds one ``[N, V]`` gradient (as a gather's backward
    does): ``g_tail * exp(lprobs_v - tail)`` outside ``ids`` (zero on a row whose tail is empty), plus
    the top-k gradients added at ``ids``."""

    @staticmethod
    def forward(ctx, lprobs, ids, chunk):
        out = lprobs.new_empty(lprobs.size(0), ids.size(-1) + 1)
        with torch.no_grad():
            out[:, :-1] = lprobs.gather(-1, ids)
            for sel in _chunks(lprobs.size(0), chunk, None):
                out[sel, -1] = _tail_rows(lprobs[sel], ids[sel]).clamp_(min=TAIL_FLOOR)
        ctx.save_for_backward(lprobs, ids, out[:, -1])
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        lprobs, ids, tail = ctx.saved_tensors
        grad = torch.empty_like(lprobs, memory_format=torch.contiguous_format)
        for sel in _chunks(lprobs.size(0), ctx.chunk, None):
            rows, g = tail[sel].unsqueeze(-1), grad_out[sel]
            weights = (lprobs[sel] - rows).exp_().scatter_(-1, ids[sel], 0.0)
            weights.masked_fill_(rows <= TAIL_FLOOR, 0.0)  # an empty (floored) tail: no entry receives its gradient
            grad[sel] = weights.mul_(g[:, -1:]).scatter_add_(-1, ids[sel], g[:, :-1])
        return grad, None, None


def bucket_log_probs(lprobs: Tensor, ids: Tensor) -> Tensor:
    """``[..., k + 1]``: ``lprobs`` ``[..., V]`` at the ids ``[..., k]``, then the log of the mass outside
    them, a log-sum-exp over those entries in chunks of positions: exact to float rounding however small
    the tail (``1 - sum`` of the top-k cancels below about ``1e-5`` in float32); ``-inf`` when the ids
    cover the vocabulary (floored at ``TAIL_FLOOR``)."""
    check_not_released(lprobs)
    flat_ids = ids.reshape(-1, ids.size(-1))
    out = _Buckets.apply(_flat(lprobs), flat_ids, chunk_rows(lprobs.size(-1)))
    return out.view(*ids.shape[:-1], ids.size(-1) + 1)
