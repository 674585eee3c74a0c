"""The gate of ``hybrid_gated_kd`` and the tensor helpers of its two levels.

* ``L_tok = s * KL(p_t^tau || p_s^tau)`` per position on the gold prefixes, or
  on the teacher-translation prefixes (``--hybrid-token-prefix teacher``);
  ``s = tau^2`` or 1 as in ``word_kd`` (:func:`token_level`);
* ``L_sent`` = label-smoothed NLL of the teacher's translation y_hat, teacher
  forcing on y_hat: the offline Seq-KD translation of the batch
  (``--hybrid-sent-target offline``) or the teacher's greedy translation
  decoded on the fly (``greedy-online``; the teacher's argmax on the y_hat
  prefixes then reproduces y_hat, the spec's self-consistent reading);
* ``u`` is the gate unit: the batch (``--gate fixed|scalar``), a sentence
  (``sentence``: G from the student's mean-pooled encoder output) or a
  position (``token``: G from the student's decoder state on y_hat, which
  needs both levels on the same prefixes).  Gate inputs are detached: the gate
  cannot bend the translation model.

A learned gate weights the student's loss as a constant (``sg(G)``) and is
trained by its own objective (``losses.gate_objective``)::

    J = sum_u w_u [ G_u * (a_u - b_u) + lambda * KL(Bernoulli(G_u) || Bernoulli(prior)) ]

``a_u``, ``b_u``: per-token *excess* losses of the two levels, i.e. each loss
minus its smallest attainable value (0 for the KL, the entropy of the smoothed
one-hot for the label-smoothed NLL), so both are KL divergences from the
level's target to the student and vanish when the student reproduces it.
``G * (a - b)`` is the G-dependent part of the hybrid loss per token: the
gate favours the level the student fits better, which is the paper's finding
(token level for easy, sentence level for hard settings).  Trained on that
alone the gate is bistable and collapses (the level it favours gets fitted
better, which favours it more; ``dL/dz = sigma'(z) (a - b)``).  The Bernoulli
prior makes the minimum in z unique, ``G* = sigmoid(logit(prior) - (a - b) /
lambda)`` (a soft-min of the two levels at temperature lambda), so G stays in
``sigmoid(logit(prior) +- D / lambda)`` when the per-token gap is at most D.
Why not a learning-progress reward: see docs/hybrid_gated_kd.md.

The pure gate math (``gated_mixture``, ``gate_objective``,
``label_smoothing_floor``) lives in :mod:`fairseq_kd.losses`; this module
holds the :class:`HybridGate` parameters, the per-position terms of the two
levels, the mixtures per gate unit and the option checks; the criterion
(:mod:`fairseq_kd.criterions.hybrid_gated_kd`) runs the passes.
"""

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from fairseq.logging import metrics
from torch import Tensor, nn

from fairseq_kd import losses
from fairseq_kd.losses import block_max, common
from fairseq_kd.errors import DistillationError

GATES = ("fixed", "scalar", "sentence", "token")
SENT_TARGETS = ("greedy-online", "offline")
TOKEN_PREFIXES = ("gold", "teacher")


class HybridGate(nn.Module):
    """A learned gate; ``forward`` returns the logit z of ``G = sigmoid(z)`` per unit.

    * ``scalar``: one parameter, ``z`` of shape ``[1]``;
    * ``sentence`` / ``token``: ``z = w . layer_norm(sg(x)) + b`` for features
      ``x`` ``[B, C]`` or ``[B, T, C]``; ``w = 0`` at start, so every unit starts
      at ``G = init``.  The non-affine layer norm makes the gate insensitive to
      the scale of the student's states.

    Computed in float32 whatever the parameters' dtype (``--fp16`` casts the
    criterion to half).
    """

    def __init__(self, kind: str, init: float = 0.5, input_dim: Optional[int] = None):
        super().__init__()
        self.kind = kind
        bias = math.log(init / (1.0 - init))
        if kind == "scalar":
            # shape [1], not []: fairseq's legacy_ddp cannot all-reduce a 0-dim gradient
            self.logit = nn.Parameter(torch.full((1,), bias))
        elif kind in ("sentence", "token"):
            self.proj = nn.Linear(input_dim, 1)
            nn.init.zeros_(self.proj.weight)
            nn.init.constant_(self.proj.bias, bias)
        else:
            raise ValueError(f"not a learned gate: {kind!r}")

    def forward(self, features: Optional[Tensor] = None) -> Tensor:
        if self.kind == "scalar":
            return self.logit.float()
        x = features.detach().float()
        if x.size(-1) != self.proj.in_features:
            raise DistillationError(
                f"--gate {self.kind} was built for {self.proj.in_features}-dim features but the student's "
                f"are {x.size(-1)}-dim: set --gate-input-dim {x.size(-1)}"
            )
        x = F.layer_norm(x, x.shape[-1:])
        return F.linear(x, self.proj.weight.float(), self.proj.bias.float()).squeeze(-1)


def check_config(cfg) -> None:
    """Raise :class:`DistillationError` on inconsistent ``hybrid_gated_kd`` options."""
    gate_kind, token_prefix = str(cfg.gate), str(cfg.hybrid_token_prefix)

    def fail(message):
        raise DistillationError(message)

    if not 0.0 <= cfg.gate_fixed_value <= 1.0:
        fail(f"--gate-fixed-value must be in [0, 1], got {cfg.gate_fixed_value}")
    if not 0.0 < cfg.gate_init < 1.0:
        fail(f"--gate-init must be in (0, 1) (a learned gate's initial G), got {cfg.gate_init}")
    if not 0.0 < cfg.gate_prior < 1.0:
        fail(f"--gate-prior must be in (0, 1), got {cfg.gate_prior}")
    if cfg.gate_prior_weight < 0:
        fail(f"--gate-prior-weight must be >= 0, got {cfg.gate_prior_weight}")
    if cfg.hybrid_max_len_a < 0 or cfg.hybrid_max_len_b < 1:
        fail(f"--hybrid-max-len-a must be >= 0 and --hybrid-max-len-b >= 1, got "
             f"{cfg.hybrid_max_len_a} and {cfg.hybrid_max_len_b}")
    if gate_kind in ("sentence", "token") and not (cfg.gate_input_dim or 0) > 0:
        fail(f"--gate {gate_kind} needs --gate-input-dim (the student's "
             f"{'encoder' if gate_kind == 'sentence' else 'decoder'} output dimension)")
    if gate_kind == "token" and token_prefix != "teacher":
        fail("--gate token mixes both levels position by position, so both must be teacher-forced "
             "on the same prefixes: add --hybrid-token-prefix teacher")


def check_gate_state(own_state, their_state, gate_kind: str) -> None:
    """Raise unless a checkpoint's criterion state has the shapes of this gate."""
    own = {k: tuple(v.shape) for k, v in own_state.items()}
    theirs = {k: tuple(v.shape) for k, v in their_state.items()}
    if own != theirs:
        raise DistillationError(
            f"the checkpoint's gate {theirs} does not fit --gate {gate_kind} {own}: "
            f"resume with the --gate and --gate-input-dim it was trained with"
        )


# -- student and teacher tensors ------------------------------------------------


def decode_student(model, prev_output_tokens: Tensor, encoder_out):
    """``(logits, features)`` of the student's decoder on ``prev_output_tokens``
    (what ``model(**net_input)`` computes, plus the states before the output projection)."""
    features, _ = model.decoder.extract_features(prev_output_tokens, encoder_out=encoder_out)
    return model.decoder.output_layer(features), features


def gold_terms(model, prev_output_tokens: Tensor, encoder_out, target: Tensor, pad: int, eps: float, grad: bool):
    """``(logits, log-probs, LS-NLL, NLL)`` of the student on the gold prefixes (with
    gradients only when ``grad``): one log-softmax for the NLL and the token level."""
    with torch.set_grad_enabled(grad):
        logits, _ = decode_student(model, prev_output_tokens, encoder_out)
        lprobs = losses.log_probs(logits)
        return (logits, lprobs) + tuple(losses.nll_from_log_probs(lprobs, target, pad, eps))


def pooled_encoder_states(encoder_out) -> Tensor:
    """Mean of the encoder states over the non-pad source positions, ``[B, C]``."""
    if not isinstance(encoder_out, dict) or "encoder_out" not in encoder_out:
        raise DistillationError(
            "--gate sentence needs a fairseq Transformer-style encoder output "
            "(a dict with 'encoder_out'); use --gate scalar or token with this model"
        )
    states = encoder_out["encoder_out"]
    states = (states[0] if isinstance(states, list) else states).transpose(0, 1)  # [B, S, C]
    mask = encoder_out.get("encoder_padding_mask")
    if isinstance(mask, list):
        mask = mask[0] if len(mask) > 0 else None
    if mask is None:
        return states.mean(dim=1)
    keep = (~mask).unsqueeze(-1).to(states.dtype)
    return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def token_level(teacher, student_logits: Tensor, target: Tensor, pad: int, temperature: float,
                student_lprobs: Optional[Tensor] = None):
    """``(KL(p_t^tau || p_s^tau) per position [B, T], its mask, the teacher's argmax [B, T])`` against the
    teacher's distribution ``teacher`` (:class:`~fairseq_kd.losses.teacher.TeacherDistribution`) on the
    student's prefixes; the student's tempered log-probs are computed unless ``student_lprobs`` are given."""
    mask = target.ne(pad)
    if student_lprobs is None:
        student_lprobs = losses.log_probs(student_logits, temperature)
    teacher_ids = teacher.argmax()  # before the KL leaves its gradient in the teacher's storage
    return teacher.divergence(student_lprobs, mask, "kl", temperature, release=True), mask, teacher_ids


def token_terms(teacher, student_logits, target, pad, temperature, kd_scale, student_lprobs=None):
    """``(L_tok per position [B, T], its mask, logging values)``: :func:`token_level` times ``kd_scale``
    (``tau^2`` or 1), with ``tok_loss``, ``tok_tokens`` and the top-1 agreement (``kd_agree``,
    ``kd_tokens``: tensors, no device sync)."""
    kl, mask, teacher_ids = token_level(teacher, student_logits, target, pad, temperature, student_lprobs)
    agree = common.agreement_from_ids(block_max.argmax_ids(student_logits.detach()), teacher_ids, target, pad)
    tokens = mask.sum()
    log = dict(tok_loss=kl.sum().data, tok_tokens=tokens, kd_agree=agree, kd_tokens=tokens)
    return kl * kd_scale, mask, log


def sentence_level(hyp_logits: Tensor, target: Tensor, pad: int, eps: float):
    """``(label-smoothed NLL per position [B, T], its NLL part, the mask)`` of y_hat."""
    mask = target.ne(pad)
    ls, nll = losses.label_smoothed_nll_from_logits(hyp_logits, target, pad, eps)  # lean: one [B, T, V] saved
    return ls, nll, mask


def sentence_terms(hyp_logits: Tensor, target: Tensor, pad: int, eps: float):
    """``(L_sent per position [B, T], its mask, logging values sent_loss, sent_nll, sent_tokens)``."""
    ls, nll, mask = sentence_level(hyp_logits, target, pad, eps)
    return ls, mask, dict(sent_loss=ls.sum().data, sent_nll=nll.sum().data, sent_tokens=mask.sum())


def student_loss(alpha: float, hybrid: Tensor, gold_ls: Tensor, gate_objective: Optional[Tensor]):
    """``(alpha * hybrid + (1 - alpha) * LS-NLL(gold) [+ J - sg(J)], logging values)``: a learned
    gate's objective adds its gradient with value 0, so the loss stays the student's."""
    loss = losses.kd_mix(gold_ls, hybrid, alpha)
    if gate_objective is None:
        return loss, {}
    return loss + (gate_objective - gate_objective.detach()), {"gate_obj": gate_objective.data}


# -- the mixtures ---------------------------------------------------------------


def per_unit(values: Tensor, gate_kind: str) -> Tensor:
    """Sums of ``[B, T]`` per-position values over the gate's units: the batch
    (``fixed``, ``scalar``), each sentence (``[B]``) or none (``token``)."""
    if gate_kind in ("fixed", "scalar"):
        return values.sum()
    if gate_kind == "sentence":
        return values.sum(dim=1)
    return values


def gate_logits(gate: Optional[HybridGate], encoder_out, hyp_features: Optional[Tensor]) -> Optional[Tensor]:
    """The logit z of ``G = sigmoid(z)`` per unit of a learned gate (None for ``--gate fixed``), from the
    detached inputs of its kind: none (``scalar``), the pooled encoder output, the decoder states on y_hat."""
    if gate is None:
        return None
    if gate.kind == "scalar":
        return gate()
    return gate(pooled_encoder_states(encoder_out) if gate.kind == "sentence" else hyp_features)


def level_weights(logits: Optional[Tensor], fixed_gate: Optional[float]):
    """``(sg(G), 1 - sg(G))``: the weights of the token and the sentence level per gate unit (floats for
    a fixed gate; a fixed gate of 1 or 0 computes one level only, whose weight is then 1)."""
    if logits is None:
        return fixed_gate, 1.0 - fixed_gate
    gate = torch.sigmoid(logits).detach()
    return gate, 1.0 - gate


def level_share(values: Optional[Tensor], weight, gate_kind: str):
    """``sum_u w_u L_u``: one level's part of the gated term (0 for a level not computed), for
    backpropagating each student pass on its own; mixed with the gold LS-NLL as :func:`student_loss`
    mixes the whole term, the passes' shares sum to its loss, up to float rounding."""
    if values is None:
        return 0.0
    return (weight * per_unit(values, gate_kind)).sum()


def fixed_mixture(token_pos: Optional[Tensor], sent_pos: Optional[Tensor], fixed_gate: float) -> Tensor:
    """``G * L_tok + (1 - G) * L_sent`` for a constant G (a level not computed is None)."""
    if sent_pos is None:
        return token_pos.sum()
    if token_pos is None:
        return sent_pos.sum()
    return losses.gated_mixture(token_pos.sum(), sent_pos.sum(), fixed_gate)


def learned_mixture(
    kind: str, logits: Tensor, token_pos, token_mask, sent_pos, sent_mask, eps: float, vocab_size: int,
    prior: float, prior_weight: float,
):
    """``(sum_u sg(G_u) L_tok,u + (1 - sg(G_u)) L_sent,u,  J,  (G of every unit, their mask))`` for the
    gate logits ``logits`` (:func:`gate_logits`)."""
    token_loss, sent_loss = per_unit(token_pos, kind), per_unit(sent_pos, kind)
    token_count = per_unit(token_mask.to(token_pos), kind)
    sent_count = per_unit(sent_mask.to(sent_pos), kind)
    values = torch.sigmoid(logits)
    hybrid = losses.gated_mixture(token_loss, sent_loss, values.detach())
    # excess losses: the KL's minimum is 0, the LS-NLL's the entropy of the smoothed one-hot
    floor = losses.label_smoothing_floor(eps, vocab_size)
    objective = losses.gate_objective(
        logits, token_loss, sent_loss - floor * sent_count, token_count, sent_count, prior, prior_weight,
    )
    return hybrid, objective, (values, sent_mask if kind == "token" else None)


def mixture(gate_kind: str, logits: Optional[Tensor], fixed_gate: Optional[float], token_pos, token_mask, sent_pos,
            sent_mask, eps: float, vocab_size: Optional[int], prior: float, prior_weight: float):
    """``(gated loss, J or None, (G of every unit, their mask or None))`` for a fixed (``logits`` None) or
    a learned gate."""
    if logits is None:
        device = (token_pos if token_pos is not None else sent_pos).device
        return fixed_mixture(token_pos, sent_pos, fixed_gate), None, (torch.full((1,), fixed_gate, device=device), None)
    return learned_mixture(
        gate_kind, logits, token_pos, token_mask, sent_pos, sent_mask, eps, vocab_size, prior, prior_weight,
    )


def gate_statistics(gate_values: Tensor, mask: Optional[Tensor] = None) -> Dict:
    """Summable logging values of G over the units (those inside ``mask``): ``gate_sum``,
    ``gate_sq_sum``, ``gate_count``; tensors, so logging forces no device sync."""
    gate_values = gate_values.detach().double()
    if mask is None:
        return dict(gate_sum=gate_values.sum(), gate_sq_sum=gate_values.pow(2).sum(), gate_count=gate_values.numel())
    gate_values = gate_values.masked_fill(~mask, 0.0)
    return dict(gate_sum=gate_values.sum(), gate_sq_sum=gate_values.pow(2).sum(), gate_count=mask.sum())


def reduce_gate_metrics(logging_outputs) -> None:
    """``gate_std``, ``sent_len_ratio`` and ``gate_obj`` from the summed logging outputs."""
    def total(key):
        return sum(log.get(key, 0) for log in logging_outputs)

    count = total("gate_count")
    if count > 0:
        mean = total("gate_sum") / count
        variance = max(float(total("gate_sq_sum")) / count - mean * mean, 0.0)
        metrics.log_scalar("gate_std", math.sqrt(variance), count, round=4)
    ntokens = total("ntokens")
    if total("sent_tokens") > 0:
        metrics.log_scalar("sent_len_ratio", total("sent_tokens") / ntokens, ntokens, round=4)
    if any("gate_obj" in log for log in logging_outputs):
        metrics.log_scalar("gate_obj", total("gate_obj") / ntokens, ntokens, round=4)
