"""The CTranslate2 translation backend (``decode --backend ctranslate2``).

The teacher checkpoint is loaded by the project's safe loader (``torch.load``
with ``weights_only=True`` and the allow-list of :mod:`fairseq_kd.checkpoints`,
dictionaries checked against ``--data``), converted once by CTranslate2's
fairseq converter, and cached next to the checkpoint as
``CHECKPOINT.ct2-SHA16/`` (the first 16 hex digits of the checkpoint's
sha256; the full digest is recorded in ``fairseq_kd_source.json`` inside and
checked on reuse), or in ``decode --ct2-dir`` (e.g. the work folder, when the
checkpoint's is read-only).  One process converts, holding ``DIR.lock``; the
others wait for it and reuse the result.  The conversion is written to a temporary directory and
renamed when complete, so an interrupted conversion is never reused, and a
checkpoint that changed gets a new directory (the stale one is not read).

Weights are stored in float32; ``--ct2-compute-type`` chooses the arithmetic
at load time: by default float16 on a GPU and float32 on the CPU, ``int8``
for int8 weights and activations (CPU or GPU), ``auto`` for CTranslate2's
fastest type on the device.

The source of each example is exactly what the fairseq backend decodes: the
binarized source tokens of the collated batch (padding and the final EOS
removed, CTranslate2 appends EOS itself) mapped back to their dictionary
strings; the decoder starts from EOS as fairseq's does.  Beam size, n-best,
``max_len_a * src_len + b`` (per batch, as fairseq), ``--min-len`` and
``--lenpen`` map to CTranslate2's options; an ensemble and a non-zero
``--unkpen`` have no CTranslate2 equivalent and are refused.
"""

import json
import logging
import os
import shutil
import time
from typing import Dict, Optional, Tuple

from fairseq_kd.decoding.backend import TranslationBackend, register_backend
from fairseq_kd.errors import DistillationError
from fairseq_kd.hashing import dictionary_hashes, sha256_of

logger = logging.getLogger("fairseq_kd.decoding")

COMPUTE_TYPES = ("default", "float32", "int8", "float16", "int8_float16", "auto")
SOURCE_RECORD = "fairseq_kd_source.json"


def converted_dir(checkpoint: str, sha256: str, cache_dir: Optional[str] = None) -> str:
    """Where the conversion of ``checkpoint`` with digest ``sha256`` is cached: next to it, or in ``cache_dir``."""
    if cache_dir:
        return os.path.join(os.path.abspath(cache_dir), f"{os.path.basename(checkpoint)}.ct2-{sha256[:16]}")
    return f"{os.path.abspath(checkpoint)}.ct2-{sha256[:16]}"


def read_conversion(path: str, sha256: str) -> Optional[Dict]:
    """The source record of the conversion in ``path`` if it is complete and of ``sha256``."""
    record = os.path.join(path, SOURCE_RECORD)
    if not (os.path.isfile(record) and os.path.isfile(os.path.join(path, "model.bin"))):
        return None
    with open(record, encoding="utf-8") as f:
        source = json.load(f)
    return source if source.get("sha256") == sha256 else None


def _converter(model, model_cfg, task):
    """A ``FairseqConverter`` whose ``_load`` reuses the already (safely) loaded model."""
    from ctranslate2.converters import fairseq as ct2_fairseq

    class LoadedModelConverter(ct2_fairseq.FairseqConverter):
        def __init__(self):
            super().__init__(model_path="", data_dir=str(task.cfg.data))

        def _load(self):
            spec = ct2_fairseq._get_model_spec(model_cfg)
            ct2_fairseq.set_transformer_encoder(spec.encoder, model.encoder)
            ct2_fairseq.set_transformer_decoder(spec.decoder, model.decoder)
            spec.register_source_vocabulary(ct2_fairseq._get_vocab(task.source_dictionary))
            spec.register_target_vocabulary(ct2_fairseq._get_vocab(task.target_dictionary))
            spec.config.decoder_start_token = spec.config.eos_token
            spec.config.add_source_eos = True
            return spec

    return LoadedModelConverter()


def convert_model(model, model_cfg, task, out_dir: str, quantization: Optional[str] = None) -> None:
    """Write the CTranslate2 conversion of the loaded fairseq ``model`` (``model_cfg``: its architecture,
    ``task``: its dictionaries) to ``out_dir``, weights in ``quantization`` (None: float32).  Raises
    CTranslate2's ``NotImplementedError`` / ``ValueError`` for what it cannot convert."""
    import torch

    with torch.no_grad():
        _converter(model, model_cfg, task).convert(out_dir, quantization=quantization, force=True)


def convert_teacher(checkpoint: str, task, teacher_data_dir: Optional[str] = None,
                    cache_dir: Optional[str] = None, poll: float = 2.0) -> Tuple[str, Dict]:
    """The CTranslate2 model directory of ``checkpoint`` and its source record
    (sha256, dictionaries, max positions), converting the checkpoint unless a
    conversion of the same file (same sha256) is cached next to it (or in
    ``cache_dir``).  One process converts, holding ``DIR.lock``; the others
    wait for it (a dead holder's lock is taken over, as a decode chunk's)."""
    from fairseq_kd.decoding.shards import ShardBusy, shard_lock

    sha256 = sha256_of(checkpoint)
    final = converted_dir(checkpoint, sha256, cache_dir)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    while True:
        try:
            with shard_lock(final, worker="ct2-conversion"):
                return _convert_teacher(checkpoint, task, teacher_data_dir, sha256, final)
        except ShardBusy:
            logger.info("waiting for another process's CTranslate2 conversion of %s (%s.lock)", checkpoint, final)
            time.sleep(poll)


def _convert_teacher(checkpoint, task, teacher_data_dir, sha256, final) -> Tuple[str, Dict]:
    from fairseq_kd.checkpoints import load_checkpoint_state
    from fairseq_kd.teacher import load_teacher

    source = read_conversion(final, sha256)
    if source is not None:
        if source.get("dictionaries_sha256") != dictionary_hashes(task.cfg.data, (task.cfg.source_lang, task.cfg.target_lang)):
            # names the differing dictionary files (or passes: same symbols)
            load_teacher([checkpoint], task, teacher_data_dir=teacher_data_dir)
        logger.info("CTranslate2 conversion of %s found: %s", checkpoint, final)
        return final, source
    if os.path.exists(final):
        raise DistillationError(
            f"{final} exists but is not a complete conversion of {checkpoint} (sha256 {sha256[:16]}...); delete it"
        )
    # the checkpoint is read by the safe loader and its dictionaries checked against the task
    teacher = load_teacher([checkpoint], task, precision="fp32", teacher_data_dir=teacher_data_dir)
    model = teacher.models[0]
    model_cfg = load_checkpoint_state(checkpoint)["cfg"].model
    source = {
        "checkpoint": os.path.abspath(checkpoint),
        "sha256": sha256,
        "dictionaries_sha256": dictionary_hashes(task.cfg.data, (task.cfg.source_lang, task.cfg.target_lang)),
        "max_positions": list(model.max_positions()),
    }
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_model(model, model_cfg, task, tmp)
    except (NotImplementedError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistillationError(f"CTranslate2 cannot convert teacher {checkpoint}: {e}; use --backend fairseq")
    with open(os.path.join(tmp, SOURCE_RECORD), "w", encoding="utf-8") as f:
        json.dump(source, f, indent=1)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if read_conversion(final, sha256) is None:
            raise
    logger.info("converted %s to CTranslate2: %s", checkpoint, final)
    return final, source


def resolve_compute_type(compute_type: str, device_type: str) -> str:
    if compute_type not in COMPUTE_TYPES:
        raise DistillationError(f"unknown --ct2-compute-type {compute_type!r}; use one of {', '.join(COMPUTE_TYPES)}")
    if compute_type == "default":
        return "float16" if device_type == "cuda" else "float32"
    return compute_type


@register_backend("ctranslate2")
class CTranslate2Backend(TranslationBackend):
    """The teacher converted to CTranslate2 (cached next to the checkpoint) and
    beam-searched by ``ctranslate2.Translator.translate_batch``."""

    def __init__(
        self, task, teacher_paths: str, settings: Dict, device, precision="fp32", teacher_data_dir=None,
        compute_type: str = "default", cache_dir: Optional[str] = None,
    ):
        try:
            import ctranslate2
        except ImportError:
            raise DistillationError("--backend ctranslate2 needs the ctranslate2 package: pip install 'fairseq-kd[ct2]'")
        import torch
        from fairseq import utils

        from fairseq_kd.teacher import split_paths

        paths = split_paths(teacher_paths)
        if len(paths) != 1:
            raise DistillationError(
                f"--backend ctranslate2 decodes one teacher checkpoint, got {len(paths)} ({teacher_paths}); "
                f"average them (fairseq-kd-average-checkpoints) or use --backend fairseq for an ensemble"
            )
        if not os.path.isfile(paths[0]):
            raise DistillationError(f"teacher checkpoint {paths[0]} not found; check --path")
        if settings["nbest"] > settings["beam"]:
            raise DistillationError(f"--nbest {settings['nbest']} cannot exceed --beam {settings['beam']}")
        if settings["unkpen"]:
            raise DistillationError(
                f"--unkpen {settings['unkpen']} has no CTranslate2 equivalent; use --backend fairseq or --unkpen 0"
            )
        if precision != "fp32":
            raise DistillationError(
                f"--teacher-precision {precision} is for --backend fairseq; with ctranslate2 use --ct2-compute-type"
            )
        device = torch.device(device)
        self.compute_type = resolve_compute_type(compute_type, device.type)
        model_dir, source = convert_teacher(paths[0], task, teacher_data_dir, cache_dir=cache_dir)
        kwargs = {"device": device.type, "compute_type": self.compute_type}
        if device.type == "cuda":
            kwargs["device_index"] = device.index or 0
        else:
            kwargs["intra_threads"] = torch.get_num_threads()
        self.translator = ctranslate2.Translator(model_dir, **kwargs)
        self.task, self.settings = task, settings
        self.max_source_len, self.max_target_len = utils.resolve_max_positions(
            task.max_positions(), tuple(source["max_positions"])
        )
        logger.info("CTranslate2 teacher %s on %s (%s)", model_dir, device, self.compute_type)

    def source_tokens(self, sample):
        """The source strings of each example: its tokens without padding and final EOS."""
        src_dict = self.task.source_dictionary
        pad, eos = src_dict.pad(), src_dict.eos()
        sources = []
        for row in sample["net_input"]["src_tokens"].tolist():
            ids = [i for i in row if i != pad]
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            sources.append([src_dict[i] for i in ids])
        return sources

    def translate(self, sample):
        s = self.settings
        src_len = int(sample["net_input"]["src_lengths"].max())
        # fairseq: at most max_len tokens (then EOS is forced), max_len = min(a * src_len + b, positions - 1);
        # CTranslate2's length limit counts the tokens without EOS
        max_len = min(int(s["max_len_a"] * src_len + s["max_len_b"]), self.max_target_len - 1)
        results = self.translator.translate_batch(
            self.source_tokens(sample),
            beam_size=s["beam"],
            num_hypotheses=s["nbest"],
            length_penalty=s["lenpen"],
            max_decoding_length=max_len,
            min_decoding_length=s["min_len"],
            return_scores=True,
            max_batch_size=0,
        )
        return [
            [(" ".join(tokens), float(score)) for tokens, score in zip(r.hypotheses, r.scores)][: s["nbest"]]
            for r in results
        ]
