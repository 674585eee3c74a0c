"""The teacher: one frozen checkpoint or an ensemble of several.

The teacher lives on the task, never on the criterion or the model, so that
fairseq's trainer does not wrap it in DDP, does not cast it with ``--fp16``,
does not hand its parameters to the optimizer and does not save it into the
student's checkpoints.  It is always in ``eval()`` mode (no dropout), its
parameters have ``requires_grad=False`` and every forward runs under
``torch.no_grad()``.

An ensemble averages the members' *probabilities* (computed in log space with
``logsumexp``); its output is a log-distribution, which every loss in
:mod:`fairseq_kd.losses` accepts in place of logits.

Bad teachers stop with one line naming the checkpoint: a file that does not
load, parameters that are not finite, an embedding or output layer whose size
differs from the task's dictionary, and dictionaries changed after the
teacher was trained (the sha256 of ``dict.{src,tgt}.txt`` that the
distillation tasks record in every checkpoint they write, compared when
present).  Non-finite output, e.g. an overflow at ``--teacher-precision
fp16``, is flagged by every forward pass without a device sync
(:meth:`TeacherEnsemble.take_nonfinite`, read by the task once per update).
"""

import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from fairseq_kd.errors import DistillationError
from fairseq_kd.hashing import sha256_of
from fairseq_kd.losses.common import log_mean_exp
from fairseq_kd.losses.teacher import DenseTeacher

logger = logging.getLogger("fairseq_kd.teacher")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def split_paths(paths: str) -> List[str]:
    """``a.pt:b.pt`` -> ``["a.pt", "b.pt"]`` (fairseq's ``--path`` convention)."""
    return [p for p in paths.split(":") if p]


def compare_dictionaries(task_dict, task_dict_file: str, teacher_dict, teacher_dict_file: str):
    """Raise :class:`DistillationError` unless both dictionaries hold the same
    symbols in the same order; the message names both files and the first
    differing index."""
    a, b = list(task_dict.symbols), list(teacher_dict.symbols)
    if a == b:
        return
    for i in range(max(len(a), len(b))):
        sa = a[i] if i < len(a) else "<end of dictionary>"
        sb = b[i] if i < len(b) else "<end of dictionary>"
        if sa != sb:
            raise DistillationError(
                f"teacher dictionary {teacher_dict_file} ({len(b)} symbols) differs from the "
                f"task dictionary {task_dict_file} ({len(a)} symbols) at index {i}: "
                f"teacher {sb!r} vs task {sa!r}; binarize the student data with the teacher's "
                f"dictionaries (fairseq-preprocess --srcdict/--tgtdict)"
            )


def _decode(decoder, prev_output_tokens: Tensor, encoder_out):
    """``decoder(prev_output_tokens, encoder_out=encoder_out)``.  fairseq's Transformer decoder returns
    its features as a transposed ``[B, T, C]`` view, on which the output projection, without a gradient,
    runs as a batched product with the weight broadcast: its features are made contiguous first, so the
    projection is one matrix product (a quarter less time on the CPU; the same values up to float
    rounding).  Other decoders are called as they are."""
    from fairseq.models.transformer import TransformerDecoderBase

    if isinstance(decoder, TransformerDecoderBase):  # called as a module (its hooks run), features only
        features, extra = decoder(prev_output_tokens, encoder_out=encoder_out, features_only=True)
        return decoder.output_layer(features.contiguous()), extra
    return decoder(prev_output_tokens, encoder_out=encoder_out)


class TeacherEnsemble:
    """One or more frozen fairseq encoder-decoder models used as the KD teacher.

    ``forward(net_input, prev_output_tokens)`` returns float32 log-probabilities
    ``[B, T, V]``.  ``forward_encoder`` / ``forward_decoder`` split the two
    halves so that a criterion can re-decode new prefixes while reusing the
    teacher's encoder output (TIE-KD's in-batch iterations).
    """

    def __init__(self, models: Sequence[nn.Module], precision: str = "fp32", paths=()):
        if not models:
            raise ValueError("a teacher needs at least one model")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown teacher precision {precision!r}; use one of {list(PRECISIONS)}")
        self.models = nn.ModuleList(models)
        self.dtype = PRECISIONS[precision]
        self.paths = list(paths)
        self.device: Optional[torch.device] = None
        self._nonfinite: Optional[Tensor] = None  # a device flag: NaN or +inf in an output since the last read
        for p in self.models.parameters():
            p.requires_grad_(False)
        self.models.eval()
        self.models.to(dtype=self.dtype)

    def __len__(self):
        return len(self.models)

    def to(self, device) -> "TeacherEnsemble":
        device = torch.device(device)
        if self.device != device:
            self.models.to(device=device, dtype=self.dtype)
            self.device = device
        return self

    def to_like(self, module: nn.Module) -> "TeacherEnsemble":
        """Move the teacher to the device of ``module``'s parameters."""
        param = next(module.parameters(), None)
        return self.to(param.device if param is not None else "cpu")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.models.parameters())

    def max_positions(self):
        """``(source, target)``: the longest example every member can read (its positional embeddings)."""
        limits = [m.max_positions() for m in self.models]
        return min(int(src) for src, _ in limits), min(int(tgt) for _, tgt in limits)

    @torch.no_grad()
    def forward_encoder(self, net_input: Dict[str, Tensor]) -> List:
        self.models.eval()
        return [
            m.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
            for m in self.models
        ]

    @torch.no_grad()
    def forward_decoder(self, prev_output_tokens: Tensor, encoder_outs: List) -> Tensor:
        self.models.eval()
        lprobs = [
            m.get_normalized_probs(_decode(m.decoder, prev_output_tokens, enc), log_probs=True).float()
            for m, enc in zip(self.models, encoder_outs)
        ]
        out = lprobs[0] if len(lprobs) == 1 else log_mean_exp(torch.stack(lprobs, dim=0), dim=0)
        self._flag_nonfinite(out)
        return out

    def _flag_nonfinite(self, lprobs: Tensor) -> None:
        # NaN and +inf (-inf is a log-probability of 0); a device tensor, so no host sync here.  The row
        # maxima (one vectorised pass; amax propagates NaN) hold both, at a tenth of an elementwise test
        bad = ~(lprobs.amax(dim=-1) < math.inf).all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad

    def take_nonfinite(self) -> bool:
        """Whether an output since the last call held NaN or +inf; resets the flag (one host sync)."""
        flag, self._nonfinite = self._nonfinite, None
        return bool(flag) if flag is not None else False

    @torch.no_grad()
    def __call__(self, net_input: Dict[str, Tensor], prev_output_tokens: Optional[Tensor] = None) -> Tensor:
        if prev_output_tokens is None:
            prev_output_tokens = net_input["prev_output_tokens"]
        return self.forward_decoder(prev_output_tokens, self.forward_encoder(net_input))

    def distribution(self, net_input: Dict[str, Tensor]) -> DenseTeacher:
        """The teacher's distribution on ``net_input``'s prefixes (teacher forcing), as the criterions read it."""
        return DenseTeacher(self(net_input))

    def decoder_distribution(self, prev_output_tokens: Tensor, encoder_outs: List) -> DenseTeacher:
        """:meth:`distribution` on other prefixes, from the encoder outputs of :meth:`forward_encoder`."""
        return DenseTeacher(self.forward_decoder(prev_output_tokens, encoder_outs))


def _teacher_dict_files(state_cfg, path: str, teacher_data_dir: Optional[str], src: str, tgt: str):
    data_dir = teacher_data_dir
    if data_dir is None:
        task_cfg = state_cfg.get("task") if state_cfg is not None else None
        data = task_cfg.get("data") if task_cfg is not None else None
        if not data:
            raise DistillationError(
                f"teacher checkpoint {path} does not record its data directory; "
                f"pass --teacher-data-dir DIR (the directory holding the teacher's dict.{src}.txt)"
            )
        data_dir = str(data).split(":")[0]
    files = [os.path.join(data_dir, f"dict.{lang}.txt") for lang in (src, tgt)]
    for f in files:
        if not os.path.isfile(f):
            raise DistillationError(
                f"teacher dictionary {f} (for teacher {path}) not found; "
                f"pass --teacher-data-dir DIR pointing at the teacher's binarized data"
            )
    return files


def check_recorded_dictionaries(state, path: str, files: Sequence[str]) -> None:
    """When ``state`` (a checkpoint) records the sha256 of its dictionaries, ``files`` must still match."""
    recorded = (state.get("task_state") or {}).get("dictionary_sha256") or {}
    for f in files:
        expected = recorded.get(os.path.basename(f))
        if expected is not None and sha256_of(f) != expected:
            raise DistillationError(
                f"teacher dictionary {f} changed after teacher {path} was trained (its sha256 differs from the "
                f"one recorded in the checkpoint): restore the dictionary the teacher was trained with, or "
                f"pass --teacher-data-dir DIR holding it"
            )


def check_teacher_parameters(state, path: str, task) -> None:
    """Embedding / output sizes against the task's dictionaries, and finite parameters."""
    params = state.get("model") or {}
    if not params:
        raise DistillationError(f"teacher checkpoint {path} holds no model parameters; pass a fairseq checkpoint")
    sizes = (
        ("encoder.embed_tokens.weight", task.source_dictionary, "source"),
        ("decoder.embed_tokens.weight", task.target_dictionary, "target"),
        ("decoder.output_projection.weight", task.target_dictionary, "target"),
    )
    for key, dictionary, side in sizes:
        weight = params.get(key)
        if weight is not None and weight.dim() >= 1 and weight.size(0) != len(dictionary):
            raise DistillationError(
                f"teacher {path}: {key} has {weight.size(0)} rows but the task's {side} dictionary has "
                f"{len(dictionary)} symbols; the teacher was trained on other data: binarize with its "
                f"dictionaries (fairseq-preprocess --srcdict/--tgtdict) or use a matching teacher"
            )
    for key, value in params.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise DistillationError(
                f"teacher {path}: parameter {key} holds NaN or inf values; use an earlier checkpoint of the teacher"
            )


def load_teacher(
    paths: Sequence[str],
    task,
    precision: str = "fp32",
    teacher_data_dir: Optional[str] = None,
    check_dictionaries: bool = True,
) -> TeacherEnsemble:
    """Load one teacher checkpoint or an ensemble and check it against ``task``.

    * every path must exist (else a one-line :class:`DistillationError`);
    * the teacher's source and target dictionaries (``dict.{lang}.txt`` in the
      teacher's data directory, read from its checkpoint or given by
      ``teacher_data_dir``) must be identical to the task's;
    * checkpoints are read through fairseq's loader, which goes through
      ``torch.load(weights_only=True)`` with the allow-list of
      :mod:`fairseq_kd.checkpoints`.
    """
    from fairseq import models
    from fairseq.data import Dictionary

    from fairseq_kd.checkpoints import load_checkpoint_state

    if isinstance(paths, str):
        paths = split_paths(paths)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DistillationError(
            f"teacher checkpoint {missing[0]} not found; check --teacher-path "
            f"(several checkpoints are separated by ':')"
        )
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    task_data_dir = str(task.cfg.data).split(":")[0]
    loaded = []
    for path in paths:
        state = load_checkpoint_state(path)
        cfg = state.get("cfg") if isinstance(state, dict) else None
        if cfg is None or cfg.get("model") is None:
            raise DistillationError(f"teacher checkpoint {path} has no model config; pass a fairseq checkpoint")
        check_teacher_parameters(state, path, task)
        if check_dictionaries:
            t_src_file, t_tgt_file = _teacher_dict_files(cfg, path, teacher_data_dir, src, tgt)
            check_recorded_dictionaries(state, path, (t_src_file, t_tgt_file))
            for task_dict, lang, t_file in (
                (task.source_dictionary, src, t_src_file),
                (task.target_dictionary, tgt, t_tgt_file),
            ):
                compare_dictionaries(
                    task_dict,
                    os.path.join(task_data_dir, f"dict.{lang}.txt"),
                    Dictionary.load(t_file),
                    t_file,
                )
        model = models.build_model(cfg.model, task)
        try:
            model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise DistillationError(
                f"teacher {path} does not fit its recorded architecture ({first[0][:160] if first else e}); "
                f"pass a checkpoint written by fairseq-train"
            )
        loaded.append(model)
        logger.info("loaded teacher %s (%d parameters)", path, sum(p.numel() for p in model.parameters()))
    return TeacherEnsemble(loaded, precision=precision, paths=paths)
