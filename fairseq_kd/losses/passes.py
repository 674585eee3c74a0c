"""Backward pass by pass: a loss that is a sum over decoder passes, backpropagated one pass at a time.

``tie_kd`` (N decoder passes) and ``hybrid_gated_kd`` (the student on the teacher's translation and
on the gold target) sum losses of several student decoder passes that share one encoder run.  Built
as one graph, every pass's ``[tokens, V]`` log-probabilities (and the teacher's, whose storage the
KL's backward reuses) stay alive until the single backward at the end.  The gradient of a sum is the
sum of the gradients, so each pass can be backpropagated as soon as its loss is formed and its graph
freed: at most one pass's full-vocabulary tensors are alive at a time.

:class:`PassBackward` does that with a ``backward(partial_loss)`` callable handed over by the task
(``optimizer.backward``, so fp16 loss scaling and AMP apply to every part):

* :meth:`~PassBackward.shared` cuts the shared input (the student's encoder output) off its graph:
  each pass reads detached leaves, whose gradients accumulate over the passes;
* :meth:`~PassBackward.__call__` backpropagates one pass's loss and returns its terms detached, so
  the criterion forms its total loss with the usual formula on the same values (the same value, bit
  for bit, as the single graph's);
* :meth:`~PassBackward.finish` backpropagates what of the total loss still has a graph (a part that
  was not split into passes), then sends the leaves' accumulated gradients into the encoder's graph
  in one backward of its own: the leaves' gradients already carry the factor the callable applied
  (the loss scale, or 0 for an ignored batch), so the chain rule is continued without another one.

Without a callable (validation, unit tests, a task that does not hand one over) every method is the
identity and the criterion builds one graph as before.  Gradients of the two ways agree to float
rounding (the summation order of the parts differs).
"""

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor


class PassBackward:
    """Per-pass backward through ``backward`` (None: one graph, nothing is done here)."""

    def __init__(self, backward: Optional[Callable[[Tensor], None]] = None):
        self.backward = backward
        self._cut: List[Tuple[Tensor, Tensor]] = []  # (tensor of the shared graph, its detached leaf)

    @property
    def active(self) -> bool:
        return self.backward is not None

    def shared(self, value):
        """``value`` (a tensor, or dicts, lists and tuples of tensors: fairseq's encoder output) as the
        passes read it: itself without a callable, else with every tensor that requires a gradient
        replaced by a detached leaf."""
        if not self.active:
            return value
        if torch.is_tensor(value):
            if not value.requires_grad:
                return value
            leaf = value.detach().requires_grad_(True)
            self._cut.append((value, leaf))
            return leaf
        if isinstance(value, dict):
            return type(value)((key, self.shared(item)) for key, item in value.items())
        if isinstance(value, tuple) and hasattr(value, "_make"):  # a named tuple
            return value._make(self.shared(item) for item in value)
        if isinstance(value, (list, tuple)):
            return type(value)(self.shared(item) for item in value)
        return value

    def __call__(self, partial: Callable[[], Tensor], *terms: Optional[Tensor]):
        """Without a callable: ``terms`` unchanged.  With one: backpropagate ``partial()`` (one pass's
        share of the loss, read from ``terms``) now, and return ``terms`` detached (None stays None)."""
        if not self.active:
            return terms
        loss = partial()
        if torch.is_tensor(loss) and loss.requires_grad:
            self.backward(loss)
        return tuple(None if term is None else term.detach() for term in terms)

    def finish(self, loss: Tensor) -> Tensor:
        """The total ``loss``: as it is without a callable; else backpropagated where it still has a
        graph, the shared input's gradients sent on, and returned detached."""
        if not self.active:
            return loss
        if loss.requires_grad:
            self.backward(loss)
        cut = [(tensor, leaf.grad) for tensor, leaf in self._cut if leaf.grad is not None]
        self._cut = []
        if cut:
            # the leaves' gradients already carry the callable's factor: no loss, no second scaling;
            # outside autocast, as the task's own backward runs
            with torch.autocast("cuda", enabled=False):
                torch.autograd.backward([tensor for tensor, _ in cut], [grad for _, grad in cut])
        return loss.detach()
