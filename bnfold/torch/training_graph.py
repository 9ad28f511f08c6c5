"""Calibration on the module's training-time graph (``training_graph=True``).

Some BNs run only in training mode: GoogLeNet's and Inception v3's auxiliary classifiers sit behind
``if self.training and self.aux_logits:``. The calibration pass runs the module in eval mode
(Algorithm 2's training network: every BN on batch statistics, everything else as in inference),
so those BNs are never called and keep their stored statistics, with a warning.
``torch.optim.swa_utils.update_bn`` reaches them by putting the whole module in train mode, which
also turns Dropout and stochastic depth on: their statistics then describe a randomly thinned
network.

:func:`training_time_forward` runs the training-time forward with the randomness switched off: every
module in train mode except

* every BN (the calibrated ones normalise with the batch's statistics anyway; the others keep
  normalising with their running statistics, as the deployed model will, and their buffers are
  not updated),
* the stochastic layers bnfold knows (:func:`is_stochastic`: torch's Dropout family,
  AlphaDropout, timm's ``DropPath``/``DropBlock2d``, torchvision's ``StochasticDepth``/``DropBlock2d``,
  ``nn.RReLU``, an ``nn.LSTM``/``GRU``/``RNN`` with inter-layer ``dropout``), which stay in eval mode,
  and attention dropout (``nn.MultiheadAttention(dropout=...)``, ``F.scaled_dot_product_attention``'s
  ``dropout_p``), which is set to 0;

and functional dropout calls (``F.dropout(x, p, training=self.training)`` and its 1d/2d/3d and
alpha variants) return their input. Any other random draw in the forward (``torch.bernoulli``,
``rand``, ``Tensor.bernoulli_``, ...) is named in a warning: the statistics may then be noisy.

:class:`RandomDraws` watches every calibration forward, eval-mode or training-time, for draws from
torch's default generators (``F.dropout(x, 0.5)``, which is on by default, noise not behind
``self.training``): a warning says the statistics include that noise.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

__all__ = ["STOCHASTIC_CLASSES", "TRAINING_GRAPH_HINT", "RandomDraws", "is_stochastic", "training_time_forward"]

#: class names of stochastic layers kept in eval mode (identity), besides torch's ``_DropoutNd``
STOCHASTIC_CLASSES = frozenset({"DropPath", "StochasticDepth", "DropBlock2d", "DropBlock3d", "DropBlock"})

#: appended to the warning for a BN that the eval-mode pass never calls
TRAINING_GRAPH_HINT = ("if it runs only in training mode (an auxiliary head), pass training_graph=True to calibrate "
                       "it on the training-time forward with Dropout and stochastic depth off")

_DROPOUTS: frozenset[Callable[..., Any]] = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
})
_RANDOM_NAMES = frozenset({"bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint",
                           "randint_like", "randperm", "normal", "normal_", "uniform_", "multinomial",
                           "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "poisson", "binomial",
                           "gumbel_softmax", "native_dropout"})
#: random only with ``training=True`` (argument 3)
_RANDOM_IF_TRAINING = frozenset({"rrelu", "rrelu_"})


def _attention_dropout(name: str, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether an attention call draws a dropout mask: ``scaled_dot_product_attention`` with
    ``dropout_p`` > 0 (argument 4), ``multi_head_attention_forward`` with ``dropout_p`` (argument 10)
    > 0 and ``training`` (default True)."""
    if name == "scaled_dot_product_attention":
        return float(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)) > 0
    if name == "multi_head_attention_forward":
        p = kwargs.get("dropout_p", args[10] if len(args) > 10 else 0.0)
        return float(p) > 0 and bool(kwargs.get("training", args[13] if len(args) > 13 else True))
    return False


def _without_attention_dropout(name: str, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The same attention call with its dropout off."""
    if name == "scaled_dot_product_attention":
        if len(args) > 4:
            return (*args[:4], 0.0, *args[5:]), kwargs
        return args, {**kwargs, "dropout_p": 0.0}
    if len(args) > 13:
        return (*args[:13], False, *args[14:]), kwargs
    return args, {**kwargs, "training": False}


def is_stochastic(m: nn.Module) -> bool:
    """A layer that draws random numbers in train mode and is deterministic in eval mode: the Dropout
    family and the classes in :data:`STOCHASTIC_CLASSES`, ``nn.RReLU`` (random slopes) and an RNN
    (``nn.LSTM`` / ``GRU`` / ``RNN``) with ``dropout`` between its layers."""
    if isinstance(m, (_DropoutNd, nn.RReLU)) or type(m).__name__ in STOCHASTIC_CLASSES:
        return True
    return isinstance(m, nn.RNNBase) and float(m.dropout) > 0


class _NoDropout(TorchFunctionMode):
    """Functional dropout returns its input; other random draws are recorded by name."""

    def __init__(self) -> None:
        super().__init__()
        self.random: set[str] = set()
        self.recording = False  # during a forward (not while the data's iterator runs)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        name = getattr(func, "__name__", "")
        if _attention_dropout(name, args, kwargs):  # nn.MultiheadAttention(dropout=...), SDPA's dropout_p
            args, kwargs = _without_attention_dropout(name, args, kwargs)
        elif self.recording and (name in _RANDOM_NAMES or (
                name in _RANDOM_IF_TRAINING and kwargs.get("training", args[3] if len(args) > 3 else False))):
            self.random.add(name)
        return func(*args, **kwargs)


class RandomDraws:
    """Whether the forwards :meth:`watch` wraps draw random numbers from torch's default generators
    (the CPU's, and the calibration device's where that is a GPU): their states are compared before
    and after each forward, which costs a few microseconds a batch and nothing per torch call. Only
    the forward is watched, not the data's iterator (a ``DataLoader`` draws its workers' seed from
    the default generator each epoch). A draw from a generator of the module's own is not seen
    here; in the training-time forward :class:`_NoDropout` names it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.index = device.index if device.index is not None else (torch.cuda.current_device() if self.cuda else 0)
        self.drew = False

    def _states(self) -> tuple[torch.Tensor, ...]:
        if self.cuda:
            return torch.get_rng_state(), torch.cuda.get_rng_state(self.index)
        return (torch.get_rng_state(),)

    @contextlib.contextmanager
    def watch(self, named: _NoDropout | None = None) -> Iterator[None]:
        """Watch one forward; ``named``, the training-time forward's mode, records names only inside."""
        before = None if self.drew else self._states()
        if named is not None:
            named.recording = True
        try:
            yield
        finally:
            if named is not None:
                named.recording = False
        if before is not None and not all(torch.equal(a, b) for a, b in zip(before, self._states())):
            self.drew = True

    def warning(self, named: _NoDropout | None) -> str | None:
        """The warning for the pass, or None: the eval-mode forward's draws (by the generators'
        states), or the training-time forward's (those, and the draws ``named`` recorded)."""
        names = sorted(named.random) if named is not None else []
        if named is not None and (names or self.drew):
            shown = f" ({', '.join(names)})" if names else ""
            return ("the training-time forward (training_graph=True) draws random numbers outside the stochastic "
                    f"layers bnfold switches off{shown}: the calibrated statistics include that noise; put those "
                    "layers in eval mode or make them identity for calibration")
        if self.drew:
            return ("the module's eval-mode forward draws random numbers (torch's random generator advanced during "
                    "it): the calibrated statistics include that noise and its output is random; make those calls "
                    "follow self.training (F.dropout(x, p, training=self.training), noise only in training) or use "
                    "nn.Dropout")
        return None


@contextlib.contextmanager
def training_time_forward(module: nn.Module) -> Iterator[_NoDropout]:
    """Run ``module``'s training-time forward inside, with BNs and stochastic layers in eval mode
    and functional dropout off (see the module docstring); the module's modes are restored after.
    Yields the torch-function mode, whose ``random`` names the draws seen while it is ``recording``
    (:meth:`RandomDraws.watch` turns that on for each forward)."""
    flags = {m: m.training for m in module.modules()}
    for m in module.modules():
        m.training = not (isinstance(m, _BatchNorm) or is_stochastic(m))
    mode = _NoDropout()
    try:
        with mode:
            yield mode
    finally:
        for m, flag in flags.items():
            m.training = flag
