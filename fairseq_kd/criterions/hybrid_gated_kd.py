"""Hybrid gated token/sentence-level KD (Wei et al., IJCAI 2024, arXiv 2404.14827).

Verified (the paper's Figure 1): ``L = G * L_token + (1 - G) * L_sentence``,
the token level matching the teacher's distribution, the sentence level
training on the teacher's argmax output.  The paper has no public code; how G
is computed and trained is reconstructed (docs/hybrid_gated_kd.md)::

    loss = (1 - alpha) * LS-NLL(gold) + alpha * sum_u [G_u * L_tok,u + (1 - G_u) * L_sent,u]

* ``L_tok = s * KL(p_t^tau || p_s^tau)`` per position on the gold prefixes, or
  on the teacher-translation prefixes (``--hybrid-token-prefix teacher``);
  ``s = tau^2`` or 1 as in ``word_kd``;
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

``alpha = 1`` (the default) is the paper's loss.  With ``--gate fixed``,
``G = 1`` is ``word_kd`` and ``G = 0`` with ``alpha = 1`` is ``seq_kd`` (the
unused level is then not computed); on teacher prefixes, ``G = a`` with
``alpha = 1`` is ``seq_kd --kd-alpha a``.

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
The objective enters the returned loss as ``J - sg(J)``: same gradient,
value 0, so ``loss`` stays comparable with ``word_kd`` and ``seq_kd``.  Why not
a learning-progress reward: see docs/hybrid_gated_kd.md.

Logged per update: ``tok_loss`` (KL per token-level token, nats),
``sent_loss`` / ``sent_nll`` (per y_hat token, nats), ``gate_mean``,
``gate_std`` (over gate units), ``gate_obj`` (per gold token),
``sent_len_ratio`` (y_hat tokens / gold tokens) and ``kd_top1_agree``.
``sample_size`` is the number of gold tokens (sentences with
``--sentence-avg``), as in ``word_kd``.  Validation: plain LS-NLL of the gold.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from torch import Tensor, nn

from fairseq_kd import losses
from fairseq_kd.criterions.base import KDCriterion, KDCriterionConfig
from fairseq_kd.errors import DistillationError

logger = logging.getLogger(__name__)

GATES = ("fixed", "scalar", "sentence", "token")
SENT_TARGETS = ("greedy-online", "offline")
TOKEN_PREFIXES = ("gold", "teacher")


@dataclass
class HybridGatedKDConfig(KDCriterionConfig):
    kd_alpha: float = field(
        default=1.0,
        metadata={
            "help": "weight of the gated term G*L_token + (1-G)*L_sentence; the label-smoothed NLL "
            "of the gold target gets 1 - kd_alpha (1 is the paper's loss, which has no gold term)"
        },
    )
    hybrid_sent_target: ChoiceEnum(SENT_TARGETS) = field(
        default="greedy-online",
        metadata={
            "help": "teacher translation trained on by the sentence level: greedy-decoded on the fly, "
            "or the offline Seq-KD corpus of the batch (task option --teacher-target-subset)"
        },
    )
    hybrid_token_prefix: ChoiceEnum(TOKEN_PREFIXES) = field(
        default="gold",
        metadata={
            "help": "prefixes the token level is teacher-forced on: the gold target, or the "
            "teacher translation (both levels then share one student pass)"
        },
    )
    hybrid_max_len_a: float = field(
        default=1.2,
        metadata={"help": "greedy-online: a sentence gets at most a*srclen+b tokens before its forced EOS"},
    )
    hybrid_max_len_b: int = field(
        default=10,
        metadata={"help": "the b of --hybrid-max-len-a"},
    )
    gate: ChoiceEnum(GATES) = field(
        default="scalar",
        metadata={
            "help": "G is a constant (--gate-fixed-value), one learned scalar, or learned from the "
            "student's detached mean-pooled encoder output (per sentence) or decoder state (per token)"
        },
    )
    gate_fixed_value: float = field(
        default=0.5,
        metadata={"help": "G of --gate fixed: 1 is word-level KD, 0 sequence-level KD"},
    )
    gate_init: float = field(
        default=0.5,
        metadata={"help": "initial G of a learned gate (bias logit(gate_init), input weights 0)"},
    )
    gate_input_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": "feature size of --gate sentence (student encoder output dim) or token "
            "(student decoder output dim)"
        },
    )
    gate_prior: float = field(
        default=0.5,
        metadata={"help": "mean of the Bernoulli prior a learned gate is regularised toward"},
    )
    gate_prior_weight: float = field(
        default=1.0,
        metadata={
            "help": "lambda, in nats per token, of KL(Bernoulli(G) || Bernoulli(gate_prior)) in a "
            "learned gate's objective; 0 leaves the gate bistable (it collapses to 0 or 1)"
        },
    )


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


# -- student and teacher helpers ------------------------------------------------


def decode_student(model, prev_output_tokens: Tensor, encoder_out):
    """``(logits, features)`` of the student's decoder on ``prev_output_tokens``
    (what ``model(**net_input)`` computes, plus the states before the output projection)."""
    features, _ = model.decoder.extract_features(prev_output_tokens, encoder_out=encoder_out)
    return model.decoder.output_layer(features), features


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


def shift_right(target: Tensor, pad: int, eos: int) -> Tensor:
    """Teacher-forcing input of a right-padded ``target`` (fairseq's collater):
    EOS, then the target without its last token, pads after each row's EOS."""
    prev = torch.full_like(target, pad)
    prev[:, 0] = eos
    prev[:, 1:] = target[:, :-1].masked_fill(target[:, :-1].eq(eos), pad)
    return prev


def per_unit(values: Tensor, gate_kind: str) -> Tensor:
    """Sums of ``[B, T]`` per-position values over the gate's units: the batch
    (``fixed``, ``scalar``), each sentence (``[B]``) or none (``token``)."""
    if gate_kind in ("fixed", "scalar"):
        return values.sum()
    if gate_kind == "sentence":
        return values.sum(dim=1)
    return values


def max_decoder_positions(model, teacher) -> int:
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


@register_criterion("hybrid_gated_kd", dataclass=HybridGatedKDConfig)
class HybridGatedKDCriterion(KDCriterion):
    def __init__(self, task, cfg: HybridGatedKDConfig):
        super().__init__(task, cfg)
        self.gate_kind = str(cfg.gate)
        self.sent_target = str(cfg.hybrid_sent_target)
        self.token_prefix = str(cfg.hybrid_token_prefix)
        self._check(cfg)
        self.eos = task.target_dictionary.eos()
        self.fixed_gate = cfg.gate_fixed_value if self.gate_kind == "fixed" else None
        # the unused level of a fixed 0/1 gate is not computed
        self.use_token_level = self.fixed_gate != 0.0
        self.use_sentence_level = self.fixed_gate != 1.0
        self.gate = (
            None if self.gate_kind == "fixed" else HybridGate(self.gate_kind, cfg.gate_init, cfg.gate_input_dim)
        )
        #: the distillation task refuses to build the criterion without --teacher-target-subset
        self.needs_teacher_target = self.sent_target == "offline" and (
            self.use_sentence_level or self.token_prefix == "teacher"
        )
        if self.gate is not None and cfg.gate_prior_weight == 0:
            logger.warning("--gate-prior-weight 0: the learned gate is bistable and will collapse to 0 or 1")

    def _check(self, cfg):
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
        if self.gate_kind in ("sentence", "token") and not (cfg.gate_input_dim or 0) > 0:
            fail(f"--gate {self.gate_kind} needs --gate-input-dim (the student's "
                 f"{'encoder' if self.gate_kind == 'sentence' else 'decoder'} output dimension)")
        if self.gate_kind == "token" and self.token_prefix != "teacher":
            fail("--gate token mixes both levels position by position, so both must be teacher-forced "
                 "on the same prefixes: add --hybrid-token-prefix teacher")

    # -- checkpoints ---------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """fairseq restores the gate with ``criterion.load_state_dict(state["criterion"])``."""
        if state_dict is None:
            logger.warning("the checkpoint has no criterion state: the gate starts from --gate-init")
            return None
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
        if strict and own != theirs:
            raise DistillationError(
                f"the checkpoint's gate {theirs} does not fit --gate {self.gate_kind} {own}: "
                f"resume with the --gate and --gate-input-dim it was trained with"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- forward -------------------------------------------------------------------

    def sentence_target(self, sample, teacher, teacher_encoder_out, model) -> Dict[str, Tensor]:
        """The teacher translation y_hat: ``target``, ``prev_output_tokens`` and,
        when known for free, ``teacher_lprobs`` on its prefixes."""
        if self.sent_target == "offline":
            if sample.get("teacher_target") is None:
                raise DistillationError(
                    "--hybrid-sent-target offline needs batches carrying the teacher's translations "
                    "(sample key 'teacher_target'): pass --teacher-target-subset NAME to the "
                    "distillation task, or use --hybrid-sent-target greedy-online"
                )
            target = sample["teacher_target"]
            prev = sample.get("teacher_prev_output_tokens")
            if prev is None:
                prev = shift_right(target, self.padding_idx, self.eos)
            return {"target": target, "prev_output_tokens": prev, "teacher_lprobs": None}
        return greedy_teacher_translation(
            teacher, sample["net_input"], self.padding_idx, self.eos,
            self.cfg.hybrid_max_len_a, self.cfg.hybrid_max_len_b,
            max_decoder_positions(model, teacher), encoder_outs=teacher_encoder_out,
        )

    def forward(self, model, sample, reduce=True, teacher=None):
        if teacher is None:  # validation
            net_output = model(**sample["net_input"])
            loss, nll_loss = losses.label_smoothed_nll(net_output[0], sample["target"], self.padding_idx, self.eps)
            return loss, self.sample_size(sample), self.base_logging_output(sample, loss, nll_loss)

        net_input, target, pad = sample["net_input"], sample["target"], self.padding_idx
        token_on_gold = self.use_token_level and self.token_prefix == "gold"
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        teacher_encoder_out = teacher.forward_encoder(net_input)
        hyp = hyp_logits = hyp_features = None
        if self.use_sentence_level or self.token_prefix == "teacher":
            hyp = self.sentence_target(sample, teacher, teacher_encoder_out, model)
            hyp_logits, hyp_features = decode_student(model, hyp["prev_output_tokens"], encoder_out)

        # gold target: the (1 - alpha) LS-NLL and the token level on gold prefixes; else logging only
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.alpha < 1 or token_on_gold)):
            gold_logits, _ = decode_student(model, net_input["prev_output_tokens"], encoder_out)
            gold_lprobs = losses.log_probs(gold_logits)
            gold_ls, gold_nll = losses.nll_from_log_probs(gold_lprobs, target, pad, self.eps)

        logging_output = {}
        token_pos = token_mask = sent_pos = sent_mask = None
        if self.use_token_level:
            if token_on_gold:
                student_logits, token_target = gold_logits, target
                teacher_lprobs = teacher.forward_decoder(net_input["prev_output_tokens"], teacher_encoder_out)
            else:
                student_logits, token_target = hyp_logits, hyp["target"]
                teacher_lprobs = hyp["teacher_lprobs"]
                if teacher_lprobs is None:
                    teacher_lprobs = teacher.forward_decoder(hyp["prev_output_tokens"], teacher_encoder_out)
            token_mask = token_target.ne(pad)
            student_soft = (
                gold_lprobs if token_on_gold and self.temperature == 1.0
                else losses.log_probs(student_logits, self.temperature)
            )
            kl = losses.kl_from_log_probs(
                student_soft, losses.log_probs(teacher_lprobs, self.temperature), token_mask
            )
            token_pos = kl * self.temperature_factor
            logging_output.update(tok_loss=kl.sum().data, tok_tokens=token_mask.sum().item())
            self.add_agreement(logging_output, student_logits, teacher_lprobs, token_target)
        if self.use_sentence_level:
            sent_mask = hyp["target"].ne(pad)
            sent_pos, sent_nll = losses.label_smoothed_nll_per_position(
                losses.log_probs(hyp_logits), hyp["target"], pad, self.eps
            )
            logging_output.update(
                sent_loss=sent_pos.sum().data, sent_nll=sent_nll.sum().data, sent_tokens=sent_mask.sum().item()
            )

        if self.gate is None:
            hybrid, gate_objective = self.fixed_mixture(token_pos, sent_pos), None
            gate_values = torch.tensor([self.fixed_gate])
        else:
            hybrid, gate_objective, gate_values = self.learned_mixture(
                token_pos, token_mask, sent_pos, sent_mask, encoder_out, hyp_features, hyp_logits.size(-1)
            )
        loss = self.alpha * hybrid
        if self.alpha < 1:
            loss = loss + (1.0 - self.alpha) * gold_ls
        if gate_objective is not None:
            # the gate's gradient, with value 0: ``loss`` stays the student's loss
            loss = loss + (gate_objective - gate_objective.detach())
            logging_output["gate_obj"] = gate_objective.data

        logging_output.update(self.base_logging_output(sample, loss, gold_nll))
        gate_values = gate_values.detach().double()
        logging_output.update(
            gate_sum=gate_values.sum().item(),
            gate_sq_sum=gate_values.pow(2).sum().item(),
            gate_count=gate_values.numel(),
        )
        return loss, self.sample_size(sample), logging_output

    def fixed_mixture(self, token_pos, sent_pos) -> Tensor:
        if not self.use_sentence_level:
            return token_pos.sum()
        if not self.use_token_level:
            return sent_pos.sum()
        return losses.gated_mixture(token_pos.sum(), sent_pos.sum(), self.fixed_gate)

    def learned_mixture(self, token_pos, token_mask, sent_pos, sent_mask, encoder_out, hyp_features, vocab_size):
        """``(sum_u sg(G_u) L_tok,u + (1 - sg(G_u)) L_sent,u,  J,  G of every unit)``."""
        if self.gate_kind == "scalar":
            logits = self.gate()
        elif self.gate_kind == "sentence":
            logits = self.gate(pooled_encoder_states(encoder_out))
        else:  # token: both levels on the teacher-translation positions
            logits = self.gate(hyp_features)
        kind = self.gate_kind
        token_loss, sent_loss = per_unit(token_pos, kind), per_unit(sent_pos, kind)
        token_count = per_unit(token_mask.to(token_pos), kind)
        sent_count = per_unit(sent_mask.to(sent_pos), kind)
        gate = torch.sigmoid(logits)
        hybrid = losses.gated_mixture(token_loss, sent_loss, gate.detach())
        # excess losses: the KL's minimum is 0, the LS-NLL's the entropy of the smoothed one-hot
        floor = losses.label_smoothing_floor(self.eps, vocab_size)
        objective = losses.gate_objective(
            logits, token_loss, sent_loss - floor * sent_count, token_count, sent_count,
            self.cfg.gate_prior, self.cfg.gate_prior_weight,
        )
        values = gate[sent_mask] if self.gate_kind == "token" else gate.reshape(-1)
        return hybrid, objective, values

    # -- metrics -------------------------------------------------------------------

    per_token_keys = ()
    ratio_keys = (
        ("kd_agree", "kd_tokens", "kd_top1_agree"),
        ("gate_sum", "gate_count", "gate_mean"),
    )

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        per_token = (("tok_loss", "tok_tokens"), ("sent_loss", "sent_tokens"), ("sent_nll", "sent_tokens"))
        for key, count_key in per_token:
            count = total(count_key)
            if count > 0 and any(key in log for log in logging_outputs):
                metrics.log_scalar(key, total(key) / count, count, round=4)
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
