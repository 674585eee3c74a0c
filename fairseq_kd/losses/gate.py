"""Hybrid gated token/sentence-level KD (Wei et al., IJCAI 2024, arXiv
2404.14827; no public code): the gated mixture and the gate's objective.

Verified: ``L = G * L_token + (1 - G) * L_sentence``.  How ``G`` is trained is
a reconstruction, argued in docs/hybrid_gated_kd.md.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_mixture(token_loss: Tensor, sentence_loss: Tensor, gate) -> Tensor:
    """``sum(G * L_token + (1 - G) * L_sentence)``: the hybrid loss of Wei et al.

    ``gate`` (a float or a tensor broadcastable to the losses) is the weight of
    the token level.  The losses are per gate unit: one scalar per batch for a
    scalar gate, ``[B]`` per-sentence sums for a sentence gate, ``[B, T]``
    per-position values (both on the same prefixes) for a token gate.
    """
    return (gate * token_loss + (1.0 - gate) * sentence_loss).sum()


def bernoulli_kl_from_logits(logits: Tensor, prior: float) -> Tensor:
    """Elementwise ``KL(Bernoulli(sigmoid(z)) || Bernoulli(prior))``, stable for any ``z``
    (computed with ``logsigmoid``; its derivative in ``z`` is
    ``sigmoid'(z) * (z - logit(prior))``)."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    gate = torch.sigmoid(logits)
    return gate * (F.logsigmoid(logits) - math.log(prior)) + (1.0 - gate) * (
        F.logsigmoid(-logits) - math.log1p(-prior)
    )


def gate_objective(
    gate_logits: Tensor,
    token_excess: Tensor,
    sentence_excess: Tensor,
    token_count: Tensor,
    sentence_count: Tensor,
    prior: float = 0.5,
    prior_weight: float = 1.0,
) -> Tensor:
    """Training objective of a learned gate ``G = sigmoid(z)``, one term per gate unit::

        J = sum_u w_u * [ G_u * (a_u - b_u) + lambda * KL(Bernoulli(G_u) || Bernoulli(prior)) ]

    with ``a_u = token_excess / token_count`` and ``b_u = sentence_excess /
    sentence_count`` the per-token *excess* losses of the two levels (each
    level's loss minus its smallest attainable value; both detached here, so
    ``J`` trains the gate only), ``w_u = (token_count + sentence_count) / 2``
    and ``lambda = prior_weight``.  ``G * (a - b)`` is, per token, the part of
    the hybrid loss that depends on G; the prior term bounds the gate away from
    0 and 1: the unique minimum in ``z`` for given losses is
    :func:`gate_equilibrium`.  Units with zero counts contribute nothing.
    """
    token_count, sentence_count = token_count.to(gate_logits), sentence_count.to(gate_logits)
    gap = (
        token_excess.detach().to(gate_logits) / token_count.clamp(min=1.0)
        - sentence_excess.detach().to(gate_logits) / sentence_count.clamp(min=1.0)
    )
    weight = 0.5 * (token_count + sentence_count)
    per_unit = torch.sigmoid(gate_logits) * gap
    if prior_weight != 0.0:
        per_unit = per_unit + prior_weight * bernoulli_kl_from_logits(gate_logits, prior)
    return (weight * per_unit).sum()


def gate_equilibrium(gap: Tensor, prior: float = 0.5, prior_weight: float = 1.0) -> Tensor:
    """``argmin_G  G * gap + lambda * KL(Bernoulli(G) || Bernoulli(prior))
    = sigmoid(logit(prior) - gap / lambda)``, for a per-token gap
    ``gap = a - b`` between the excess losses of the token and the sentence
    level (``lambda = prior_weight > 0``)."""
    if prior_weight <= 0:
        raise ValueError(f"prior_weight must be > 0 for a finite equilibrium, got {prior_weight}")
    return torch.sigmoid(math.log(prior / (1.0 - prior)) - gap / prior_weight)
