"""Hybrid gated token/sentence-level KD (Wei et al., IJCAI 2024, arXiv 2404.14827).

``loss = (1 - alpha) * LS-NLL(gold) + alpha * sum_u [G_u * L_tok,u + (1 - G_u) * L_sent,u]``: the token
level matches the teacher's distribution, the sentence level trains on the teacher's argmax output
(the paper's Figure 1); how G is computed and trained is reconstructed. The levels, the gate units and
the gate's objective live in :mod:`fairseq_kd.modules.hybrid_gate`, the online greedy translation in
:mod:`fairseq_kd.teacher.greedy`; the criterion runs the student's two passes (on y_hat, on gold); the readings, limits (``--gate fixed`` at 1 is ``word_kd``, at 0
``seq_kd``) and logged values are documented in docs/hybrid_gated_kd.md.  Validation: plain LS-NLL.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum

from fairseq_kd.criterions.base import KDCriterion, KDCriterionConfig
from fairseq_kd.errors import DistillationError
from fairseq_kd.losses.common import kd_mix
from fairseq_kd.losses.passes import PassBackward
from fairseq_kd.losses.teacher import DenseTeacher
from fairseq_kd.modules import hybrid_gate
from fairseq_kd.modules.hybrid_gate import GATES, SENT_TARGETS, TOKEN_PREFIXES, HybridGate
from fairseq_kd.teacher.greedy import greedy_teacher_translation, max_decoder_positions, shift_right

logger = logging.getLogger(__name__)


@dataclass
class HybridGatedKDConfig(KDCriterionConfig):
    kd_alpha: float = field(default=1.0, metadata={
        "help": "weight of the gated term G*L_token + (1-G)*L_sentence; the label-smoothed NLL "
        "of the gold target gets 1 - kd_alpha (1 is the paper's loss, which has no gold term)"})
    hybrid_sent_target: ChoiceEnum(SENT_TARGETS) = field(default="greedy-online", metadata={
        "help": "teacher translation trained on by the sentence level: greedy-decoded on the fly, "
        "or the offline Seq-KD corpus of the batch (task option --teacher-target-subset)"})
    hybrid_token_prefix: ChoiceEnum(TOKEN_PREFIXES) = field(default="gold", metadata={
        "help": "prefixes the token level is teacher-forced on: the gold target, or the "
        "teacher translation (both levels then share one student pass)"})
    hybrid_max_len_a: float = field(default=1.2, metadata={
        "help": "greedy-online: a sentence gets at most a*srclen+b tokens before its forced EOS"})
    hybrid_max_len_b: int = field(default=10, metadata={"help": "the b of --hybrid-max-len-a"})
    gate: ChoiceEnum(GATES) = field(default="scalar", metadata={
        "help": "G is a constant (--gate-fixed-value), one learned scalar, or learned from the "
        "student's detached mean-pooled encoder output (per sentence) or decoder state (per token)"})
    gate_fixed_value: float = field(default=0.5, metadata={
        "help": "G of --gate fixed: 1 is word-level KD, 0 sequence-level KD"})
    gate_init: float = field(default=0.5, metadata={
        "help": "initial G of a learned gate (bias logit(gate_init), input weights 0)"})
    gate_input_dim: Optional[int] = field(default=None, metadata={
        "help": "feature size of --gate sentence (student encoder output dim) or token "
        "(student decoder output dim)"})
    gate_prior: float = field(default=0.5, metadata={
        "help": "mean of the Bernoulli prior a learned gate is regularised toward"})
    gate_prior_weight: float = field(default=1.0, metadata={
        "help": "lambda, in nats per token, of KL(Bernoulli(G) || Bernoulli(gate_prior)) in a "
        "learned gate's objective; 0 leaves the gate bistable (it collapses to 0 or 1)"})


@register_criterion("hybrid_gated_kd", dataclass=HybridGatedKDConfig)
class HybridGatedKDCriterion(KDCriterion):
    #: the student's encoder and decoder are called separately: the task refuses torch's DDP
    calls_model_parts = True
    #: the task hands ``forward`` a ``backward`` callable and leaves the backward to it
    backward_per_pass = True

    def __init__(self, task, cfg: HybridGatedKDConfig):
        super().__init__(task, cfg)
        self.gate_kind = str(cfg.gate)
        self.sent_target = str(cfg.hybrid_sent_target)
        self.token_prefix = str(cfg.hybrid_token_prefix)
        hybrid_gate.check_config(cfg)
        self.eos = task.target_dictionary.eos()
        self.fixed_gate = cfg.gate_fixed_value if self.gate_kind == "fixed" else None
        # the unused level of a fixed 0/1 gate is not computed
        self.use_token_level = self.fixed_gate != 0.0
        self.use_sentence_level = self.fixed_gate != 1.0
        self.gate = None if self.gate_kind == "fixed" else HybridGate(self.gate_kind, cfg.gate_init, cfg.gate_input_dim)
        #: the distillation task refuses to build the criterion without --teacher-target-subset
        self.needs_teacher_target = self.sent_target == "offline" and (
            self.use_sentence_level or self.token_prefix == "teacher"
        )
        if self.gate is not None and cfg.gate_prior_weight == 0:
            logger.warning("--gate-prior-weight 0: the learned gate is bistable and will collapse to 0 or 1")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """fairseq restores the gate with ``criterion.load_state_dict(state["criterion"])``."""
        if state_dict is None:
            logger.warning("the checkpoint has no criterion state: the gate starts from --gate-init")
            return None
        if strict:
            hybrid_gate.check_gate_state(self.state_dict(), state_dict, self.gate_kind)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def runs_teacher_on_translation(self) -> bool:
        """Whether the teacher decodes the translation y_hat (greedy online) or scores it (the token level on
        teacher prefixes): then it must be the live teacher, whose encoder output the passes share."""
        return ((self.use_token_level and self.token_prefix != "gold")
                or (self.use_sentence_level and self.sent_target != "offline"))

    def teacher_cache_error(self, manifest):
        if self.use_token_level and self.token_prefix != "gold":
            return "the token level on teacher prefixes needs the live teacher: use --hybrid-token-prefix gold"
        if self.use_sentence_level and self.sent_target != "offline":
            return ("the online greedy sentence targets need the live teacher: use --hybrid-sent-target "
                    "offline (with --teacher-target-subset) or --gate fixed --gate-fixed-value 1")
        return None

    def forward(self, model, sample, reduce=True, teacher=None, backward=None, reference=True):
        """``backward`` (from the task in training): the passes on y_hat and on gold, each backpropagated when
        formed; ``reference=False`` (source-only rows): the gated term alone."""
        if teacher is None:  # validation
            return self.gold_forward(model, sample)
        step, alpha, kind = PassBackward(backward), self.mix_alpha(reference), self.gate_kind
        net_input = sample["net_input"]
        token_on_gold = self.use_token_level and self.token_prefix == "gold"
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        decoder_in = step.shared(encoder_out)  # what the student's passes read
        teacher_encoder_out = teacher.forward_encoder(net_input) if self.runs_teacher_on_translation else None
        logging_output, vocab, hyp_features = {}, None, None
        token_pos = token_mask = sent_pos = sent_mask = None  # per-position levels and their masks
        if self.use_sentence_level or self.token_prefix == "teacher":  # the student's pass on y_hat
            token_pos, token_mask, sent_pos, sent_mask, hyp_features, vocab = self.hyp_pass(
                sample, teacher, teacher_encoder_out, model, decoder_in,
                self.use_token_level and not token_on_gold, logging_output)
        logits = hybrid_gate.gate_logits(self.gate, encoder_out, hyp_features)
        token_w, sent_w = hybrid_gate.level_weights(logits, self.fixed_gate)
        token_pos, sent_pos = step(lambda: kd_mix(None, hybrid_gate.level_share(token_pos, token_w, kind)
                                                  + hybrid_gate.level_share(sent_pos, sent_w, kind), alpha),
                                   token_pos, sent_pos)

        # gold target: the (1 - alpha) LS-NLL and the token level on gold prefixes; else logging only
        gold_token, gold_mask, gold_ls, gold_nll = self.gold_pass(
            model, teacher, teacher_encoder_out, sample, decoder_in, token_on_gold,
            torch.is_grad_enabled() and (alpha < 1 or token_on_gold), logging_output)
        gold_token, gold_ls = step(lambda: kd_mix(gold_ls, hybrid_gate.level_share(gold_token, token_w, kind), alpha),
                                   gold_token, gold_ls)
        if token_on_gold:
            token_pos, token_mask = gold_token, gold_mask

        hybrid, gate_objective, gate_values = hybrid_gate.mixture(
            kind, logits, self.fixed_gate, token_pos, token_mask, sent_pos, sent_mask, self.eps,
            vocab, self.cfg.gate_prior, self.cfg.gate_prior_weight,
        )
        loss, gate_log = hybrid_gate.student_loss(alpha, hybrid, gold_ls, gate_objective)
        loss = step.finish(loss)  # per pass: what is left is the learned gate's objective
        logging_output.update(**gate_log, **self.base_logging_output(sample, loss, gold_nll),
                              **hybrid_gate.gate_statistics(*gate_values))
        return loss, self.sample_size(sample), logging_output

    # -- the passes ------------------------------------------------------------------

    def sentence_target(self, sample, teacher, teacher_encoder_out, model):
        """The teacher translation y_hat: ``target``, ``prev_output_tokens`` and, when known for free,
        ``teacher_lprobs`` on its prefixes."""
        pad, eos = self.padding_idx, self.eos
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
                prev = shift_right(target, pad, eos)
            return {"target": target, "prev_output_tokens": prev, "teacher_lprobs": None}
        return greedy_teacher_translation(
            teacher, sample["net_input"], pad, eos, self.cfg.hybrid_max_len_a, self.cfg.hybrid_max_len_b,
            max_decoder_positions(model, teacher), encoder_outs=teacher_encoder_out,
        )

    def hyp_pass(self, sample, teacher, teacher_encoder_out, model, encoder_out, token: bool, logging_output):
        """The student's pass on the teacher translation y_hat (:meth:`sentence_target`): ``(L_tok, its
        mask, L_sent, its mask)`` per position (None for a level not asked for: ``token``, the sentence
        level unless used), the student's decoder states on y_hat and the vocabulary size; the levels'
        logging values go to ``logging_output``.  Nothing full-size outlives the call but what backward needs."""
        pad = self.padding_idx
        hyp = self.sentence_target(sample, teacher, teacher_encoder_out, model)
        hyp_teacher = hyp.pop("teacher_lprobs")
        hyp_teacher = DenseTeacher(hyp_teacher) if token and hyp_teacher is not None else None  # unused: freed
        hyp_logits, hyp_features = hybrid_gate.decode_student(model, hyp["prev_output_tokens"], encoder_out)
        token_pos = token_mask = sent_pos = sent_mask = None
        if token:
            if hyp_teacher is None:
                hyp_teacher = teacher.decoder_distribution(hyp["prev_output_tokens"], teacher_encoder_out)
            token_pos, token_mask, token_log = hybrid_gate.token_terms(
                hyp_teacher, hyp_logits, hyp["target"], pad, self.temperature, self.kd_scale)
            logging_output.update(token_log)
        if self.use_sentence_level:
            sent_pos, sent_mask, sent_log = hybrid_gate.sentence_terms(hyp_logits, hyp["target"], pad, self.eps)
            logging_output.update(sent_log)
        return token_pos, token_mask, sent_pos, sent_mask, hyp_features, hyp_logits.size(-1)

    def gold_pass(self, model, teacher, teacher_encoder_out, sample, encoder_out, token: bool, grad: bool,
                  logging_output):
        """The student's pass on the gold target: ``(L_tok per position and its mask, or None, None unless
        ``token``; LS-NLL; NLL)``, with gradients only when ``grad``; the token level's logging values go to
        ``logging_output``.  The teacher runs first, so its logits are gone before the student's exist."""
        prev, target, pad = sample["net_input"]["prev_output_tokens"], sample["target"], self.padding_idx
        distribution = None
        if token:  # on the gold prefixes: the cached teacher, or the live one from its shared encoder output
            distribution = (self.teacher_distribution(sample, teacher) if teacher_encoder_out is None
                            else teacher.decoder_distribution(prev, teacher_encoder_out))
        logits, lprobs, gold_ls, gold_nll = hybrid_gate.gold_terms(model, prev, encoder_out, target, pad, self.eps, grad)
        if not token:
            return None, None, gold_ls, gold_nll
        token_pos, token_mask, token_log = hybrid_gate.token_terms(
            distribution, logits, target, pad, self.temperature, self.kd_scale,
            student_lprobs=lprobs if self.temperature == 1.0 else None,
        )
        logging_output.update(token_log)
        return token_pos, token_mask, gold_ls, gold_nll

    # -- metrics -------------------------------------------------------------------

    per_token_keys = ()
    ratio_keys = (("kd_agree", "kd_tokens", "kd_top1_agree"), ("gate_sum", "gate_count", "gate_mean"),
                  ("tok_loss", "tok_tokens", "tok_loss"), ("sent_loss", "sent_tokens", "sent_loss"),
                  ("sent_nll", "sent_tokens", "sent_nll"))

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        hybrid_gate.reduce_gate_metrics(logging_outputs)
