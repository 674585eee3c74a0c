"""The teacher's greedy translation of a batch, decoded on the fly (the
online sentence-level target of ``hybrid_gated_kd``)."""

import math
from typing import Dict

import torch
from torch import Tensor


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

    Each step re-runs the teacher's decoder on the whole prefix
    (``teacher.forward_decoder``) and appends the argmax of the last position,
    with fairseq's generator constraints: PAD is never chosen, EOS not at the
    first step, and a sentence whose budget ``floor(a * srclen + b)`` (source
    tokens without EOS, capped at ``max_positions - 1``) is spent gets EOS.
    Finished rows are padded; decoding stops when every row has its EOS.

    Returns ``target`` ``[B, T']`` (right-padded, each row ending in EOS),
    ``prev_output_tokens`` (EOS + target shifted right), ``ntokens`` and
    ``teacher_lprobs`` ``[B, T', V]``: the teacher's log-probabilities
    teacher-forced on ``prev_output_tokens`` (the last step's output), whose
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
    lprobs = None
    for step in range(steps):
        lprobs = teacher.forward_decoder(tokens[:, : step + 1], encoder_outs)
        scores = lprobs[:, -1, :].clone()
        scores[:, pad] = -math.inf
        if step == 0:
            scores[:, eos] = -math.inf
        chosen = torch.where(budget.le(step), forced_eos, scores.argmax(dim=-1))
        tokens[:, step + 1] = chosen.masked_fill(finished, pad)
        finished |= tokens[:, step + 1].eq(eos)
        if bool(finished.all()):
            break
    length = step + 1
    target = tokens[:, 1 : length + 1].contiguous()
    return {
        "target": target,
        "prev_output_tokens": shift_right(target, pad, eos),
        "ntokens": int(target.ne(pad).sum()),
        "teacher_lprobs": lprobs,
    }
