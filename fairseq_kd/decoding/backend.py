"""The translation-backend interface and its registry.

A backend turns a teacher into a :data:`Translator`: it receives one collated
batch of a :class:`~fairseq_kd.decoding.corpus.Corpus` (fairseq's
``LanguagePairDataset`` collater: ``sample["id"]``,
``sample["net_input"]["src_tokens"]``, left-padded) and returns, per example
in batch order, its n-best ``(BPE'd hypothesis text, score)`` pairs, best
first.

Backends are registered by name in :data:`BACKENDS`.  The backend NAME lives
in ``fairseq_kd/decoding/NAME_backend.py``, a module that defines a subclass
of :class:`TranslationBackend` decorated with ``@register_backend("NAME")``;
:func:`get_backend` imports it on first use, so a new backend is one new file.
"""

import importlib
from typing import Callable, Dict, List, Optional, Tuple, Type

from fairseq_kd.errors import DistillationError

#: a translation function: collated batch -> per example (in batch order) a list
#: of (BPE'd hypothesis text, score) pairs, best first
Translator = Callable[[dict], List[List[Tuple[str, float]]]]


class TranslationBackend:
    """A loaded teacher that translates batches.

    Subclasses are built as ``Backend(task, teacher_paths, settings, device,
    precision, teacher_data_dir)``: ``task`` is the fairseq translation task of
    ``--data`` (its dictionaries), ``settings`` the generation settings
    recorded in the manifest (beam, nbest, max_len_a/b, min_len, lenpen,
    unkpen, teacher).  They set :attr:`max_source_len` and implement
    :meth:`translate`.
    """

    #: sources longer than this (tokens, EOS included) are not decoded; None: no limit
    max_source_len: Optional[int] = None

    def translate(self, sample: dict) -> List[List[Tuple[str, float]]]:
        """Per example of the collated ``sample``, in batch order, the n-best
        ``(BPE'd text, score)`` pairs, best first."""
        raise NotImplementedError

    def __call__(self, sample: dict) -> List[List[Tuple[str, float]]]:
        return self.translate(sample)


#: backend name -> class
BACKENDS: Dict[str, Type[TranslationBackend]] = {}


def register_backend(name: str):
    """Class decorator: register a :class:`TranslationBackend` under ``name``."""

    def register(cls):
        if name in BACKENDS and BACKENDS[name] is not cls:
            raise ValueError(f"translation backend {name!r} is already registered ({BACKENDS[name].__name__})")
        BACKENDS[name] = cls
        return cls

    return register


def get_backend(name: str) -> Type[TranslationBackend]:
    """The backend class registered as ``name``, importing
    ``fairseq_kd.decoding.NAME_backend`` when it is not registered yet."""
    if name not in BACKENDS:
        module = f"fairseq_kd.decoding.{name}_backend"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
        if name not in BACKENDS:
            raise DistillationError(
                f"unknown translation backend {name!r}: no module {module} registering it "
                f"(known: {', '.join(sorted(BACKENDS)) or 'none loaded'})"
            )
    return BACKENDS[name]
