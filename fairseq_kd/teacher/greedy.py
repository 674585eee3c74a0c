"""The teacher's greedy translation of a batch, decoded on the fly (the
online sentence-level target of ``hybrid_gated_kd``).

Decoding is incremental (fairseq's incremental state: each step feeds only
the newest token and normalises only the last position), then one
teacher-forced pass over the finished translations gives the log-probabilities
the token level needs: ``O(T)`` decoder work per batch instead of the
``O(T^2)`` of re-running the decoder on the whole prefix at every step.
"""

import math
from typing import Dict, List

import torch
from fairseq.models import FairseqIncrementalDecoder
from torch import Tensor

from fairseq_kd.losses.block_max import argmax_ids
from fairseq_kd.losses.common import log_mean_exp


def shift_right(target: Tensor, pad: int, eos: int) -> Tensor:
    """Teacher-forcing input of a right-padded ``target`` (fairseq's collater):
    EOS, then the target without its last token, pads after each row's EOS."""
    prev = torch.full_like(target, pad)
    prev[:, 0] = eos
    prev[:, 1:] = target[:, :-1].masked_fill(target[:, :-1].eq(eos), pad)
    return prev


def max_decoder_positions(model, teacher) -> int:
    """The smallest decoder length limit of the student and the teacher's models (1024 if none)."""
    limits = [model.max_decoder_positions()]
    limits += [m.max_decoder_positions() for m in getattr(teacher, "models", ())]
    limits = [int(x) for x in limits if x is not None and x < float("inf")]
    return min(limits) if limits else 1024


class _LastPositionScores:
    """The teacher's (ensemble's) log-probabilities of the next token, one step at a time.

    Members with an incremental decoder keep fairseq's incremental state and
    decode the newest token only; others re-decode the prefix (their last
    position is used).  The members' probabilities are averaged in log space,
    as :meth:`TeacherEnsemble.forward_decoder` does."""

    def __init__(self, teacher, encoder_outs: List):
        self.models = list(teacher.models)
        self.encoder_outs = encoder_outs
        self.states = [{} if isinstance(m.decoder, FairseqIncrementalDecoder) else None for m in self.models]

    def __call__(self, prefix: Tensor) -> Tensor:
        lprobs = []
        for model, encoder_out, state in zip(self.models, self.encoder_outs, self.states):
            if state is not None:
                out = model.decoder(prefix, encoder_out=encoder_out, incremental_state=state)
            else:
                out = model.decoder(prefix, encoder_out=encoder_out)
            out = (out[0][:, -1:, :],) + tuple(out[1:])
            lprobs.append(model.get_normalized_probs(out, log_probs=True).float()[:, -1, :])
        if len(lprobs) == 1:
            return lprobs[0]
        return log_mean_exp(torch.stack(lprobs, dim=0), dim=0)


@torch.no_grad()
def greedy_teacher_translation(
    teacher,
    net_input: Dict[str, Tensor],
    pad: int,
    eos: int,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    max_positions: int = 1024,
    encoder_outs=None,
) -> Dict[str, Tensor]:
    """The teacher's greedy translation of a batch, decoded in parallel.

    Each step decodes the newest token incrementally and appends the argmax
    of its log-probabilities, with fairseq's generator constraints: PAD is
    never chosen, EOS not at the first step, and a sentence whose budget
    ``floor(a * srclen + b)`` (source tokens without EOS, capped at
    ``max_positions - 1``) is spent gets EOS.  Finished rows are padded;
    decoding stops when every row has its EOS.

    Returns ``target`` ``[B, T']`` (right-padded, each row ending in EOS),
    ``prev_output_tokens`` (EOS + target shifted right), ``ntokens`` and
    ``teacher_lprobs`` ``[B, T', V]``: the teacher's log-probabilities
    teacher-forced on ``prev_output_tokens`` (one pass after decoding), whose
    argmax reproduces the target wherever EOS was not forced.
    """
    src_tokens = net_input["src_tokens"]
    if encoder_outs is None:
        encoder_outs = teacher.forward_encoder(net_input)
    src_len = (src_tokens.ne(pad) & src_tokens.ne(eos)).sum(dim=1)
    budget = torch.floor(max_len_a * src_len.double() + max_len_b).long().clamp(0, max(max_positions - 1, 0))
    bsz, steps = src_tokens.size(0), int(budget.max()) + 1
    tokens = src_tokens.new_full((bsz, steps + 1), pad)
    tokens[:, 0] = eos
    finished = torch.zeros(bsz, dtype=torch.bool, device=src_tokens.device)
    forced_eos = torch.full_like(budget, eos)
    next_scores = _LastPositionScores(teacher, encoder_outs)
    for step in range(steps):
        scores = next_scores(tokens[:, : step + 1])
        scores[:, pad] = -math.inf
        if step == 0:
            scores[:, eos] = -math.inf
        chosen = torch.where(budget.le(step), forced_eos, argmax_ids(scores))
        tokens[:, step + 1] = chosen.masked_fill(finished, pad)
        finished |= tokens[:, step + 1].eq(eos)
        if bool(finished.all()):
            break
    length = step + 1
    target = tokens[:, 1 : length + 1].contiguous()
    prev_output_tokens = shift_right(target, pad, eos)
    return {
        "target": target,
        "prev_output_tokens": prev_output_tokens,
        "ntokens": int(target.ne(pad).sum()),
        "teacher_lprobs": teacher.forward_decoder(prev_output_tokens, encoder_outs),
    }
