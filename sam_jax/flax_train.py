"""SAM in the two training-loop idioms Flax users write: linen + ``TrainState``, NNX + ``nnx.Optimizer``.

Every member of the SAM family (``sam_jax.sam`` and friends) needs ``grad_fn=``, a
function ``params -> grads`` of the *same minibatch* at another point, in its
``update``. The two common Flax loops have no place for it:

* linen: ``flax.training.train_state.TrainState.apply_gradients(grads=g)`` calls
  ``tx.update(g, opt_state, params)`` without extra arguments, so a SAM chain fails
  with ``sam.update needs grad_fn=...``. :class:`SAMTrainState` is a drop-in
  subclass whose ``apply_gradients`` takes ``grad_fn=`` and whose
  :meth:`SAMTrainState.apply_loss` takes the loss itself::

      state = sam_jax.SAMTrainState.create(apply_fn=model.apply, params=params,
                                           tx=optax.chain(sam_jax.sam(0.05), optax.sgd(0.1)))
      state, loss = state.apply_loss(loss_fn, batch)        # loss_fn(params, batch)

* NNX: ``nnx.Optimizer.update(model, grads, **kwargs)`` forwards ``grad_fn=`` to the
  transform, but the function must evaluate the loss at a parameter ``nnx.State``
  (split the model, merge the new parameters, differentiate, return a pure state of
  the same structure). :func:`nnx_value_and_grad_fn` builds it from a loss over the
  model and a batch, and :func:`nnx_update` does the whole step::

      optimizer = nnx.Optimizer(model, optax.chain(sam_jax.sam(0.05), optax.sgd(0.1)), wrt=nnx.Param)
      loss = sam_jax.nnx_update(optimizer, model, loss_fn, batch)   # loss_fn(model, batch)

BatchNorm follows google-research/sam (and ``sam_jax.train``): the running statistics
come from the clean pass at the current parameters; the pass at the perturbed point
updates nothing. Dropout: the perturbed pass uses the clean pass's mask (linen: the
``dropout`` key the loss closes over; NNX: the model's RNG state as it was before the
clean pass), so ``grad_fn`` at the current parameters returns the clean gradient.

Without ``grad_fn`` and for transforms that do not take extra arguments (plain
``optax.sgd``) both helpers behave as Flax's own ``TrainState`` / ``Optimizer``, so one
training loop serves SGD and SAM phases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import optax
from flax import nnx
from flax.training import train_state

__all__ = [
    "SAMTrainState",
    "value_and_grad_fn",
    "nnx_grad_fn",
    "nnx_value_and_grad_fn",
    "nnx_update",
]


def _extra_args_tx(tx):
    """``tx`` as a transformation that accepts (and, if it does not use them, drops) extra args."""
    return optax.with_extra_args_support(tx)


def value_and_grad_fn(loss_fn: Callable, params, *args, has_aux: bool = False):
    """Clean loss, gradient and the ``grad_fn`` SAM needs, for ``loss_fn(params, *args)``.

    Returns ``(value, grads, grad_fn)``: ``value`` is ``loss`` (or ``(loss, aux)`` with
    ``has_aux``) and ``grads`` its gradient at ``params``, both from one
    ``jax.value_and_grad`` call (the clean pass); ``grad_fn(p)`` is the gradient of
    the same ``loss_fn`` on the same ``args`` at ``p`` (its aux, e.g. the perturbed
    pass's BatchNorm statistics, is discarded).
    """
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)

    def grad_fn(p):
        result = jax.grad(loss_fn, has_aux=has_aux)(p, *args)
        return result[0] if has_aux else result

    return value, grads, grad_fn


class SAMTrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` whose ``apply_gradients`` can pass ``grad_fn``.

    A drop-in subclass (``create``, ``replace``, checkpointing and ``step`` are
    Flax's). It adds an optional ``batch_stats`` field (``None`` for models without
    BatchNorm; the field Flax's BatchNorm tutorial adds by subclassing) and:

    * ``apply_gradients(grads=g, grad_fn=f, update_kwargs=None, **replace)``:
      ``tx.update(g, opt_state, params, grad_fn=f, **update_kwargs)``; without
      ``grad_fn`` exactly Flax's ``apply_gradients`` (a SAM chain then raises its
      ``needs grad_fn`` error). ``update_kwargs`` carries other inputs a transform
      declares (``hvp_grad_fn`` for Eigen-SAM with BatchNorm, ``learning_rate``).
    * :meth:`apply_loss`: computes the clean loss and gradient and ``grad_fn`` from a
      loss function and applies them.
    """

    batch_stats: Any = None

    def apply_gradients(self, *, grads, grad_fn: Optional[Callable] = None,
                        update_kwargs: Optional[dict] = None, **kwargs):
        if isinstance(grads, dict) and train_state.OVERWRITE_WITH_GRADIENT in grads:
            raise NotImplementedError(
                "SAMTrainState does not support the overwrite-with-gradient collection; "
                "use flax's TrainState for FP8 training")
        extra = dict(update_kwargs or {})
        if grad_fn is not None:
            extra["grad_fn"] = grad_fn
        tx = _extra_args_tx(self.tx) if extra else self.tx
        updates, new_opt_state = tx.update(grads, self.opt_state, self.params, **extra)
        new_params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs)

    def apply_loss(self, loss_fn: Callable, *args, has_aux: bool = False,
                   update_kwargs: Optional[dict] = None, **kwargs):
        """One step from ``loss_fn(params, *args)``: returns ``(new_state, value)``.

        ``value`` is the clean loss at the current parameters, or ``(loss, aux)``
        with ``has_aux`` (as ``jax.value_and_grad``). The transform gets the clean
        gradient and ``grad_fn`` = the gradient of the same ``loss_fn`` on the same
        ``args`` at any point. For BatchNorm return the new statistics as aux and put
        them in the state (they are the clean pass's; the perturbed pass's are
        dropped)::

            def loss_fn(params, batch):
                logits, new = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                             batch["x"], train=True, mutable=["batch_stats"])
                return cross_entropy(logits, batch["y"]), new["batch_stats"]

            state, (loss, batch_stats) = state.apply_loss(loss_fn, batch, has_aux=True)
            state = state.replace(batch_stats=batch_stats)

        ``**kwargs`` are fields to ``replace`` as in ``apply_gradients``.
        """
        value, grads, grad_fn = value_and_grad_fn(loss_fn, self.params, *args, has_aux=has_aux)
        new_state = self.apply_gradients(grads=grads, grad_fn=grad_fn, update_kwargs=update_kwargs, **kwargs)
        return new_state, value


def nnx_grad_fn(loss_fn: Callable, model: nnx.Module, *args, wrt: Any = nnx.Param,
                has_aux: bool = False, eval_mode: bool = False) -> Callable:
    """``params -> grads`` of ``loss_fn(model, *args)`` on a snapshot of ``model`` taken now.

    ``params`` is the pure parameter state ``nnx.Optimizer.update`` hands the transform
    (``nnx.as_pure(nnx.state(model, wrt))``); the result is a pure state of the same
    structure. Each call rebuilds a copy of the model from the snapshot (parameters
    replaced by ``params``), differentiates on it and writes nothing back. Call it
    *before* the clean pass, as :func:`nnx_value_and_grad_fn` does, so that the copy
    sees the clean pass's RNG state (dropout mask). ``eval_mode=True`` puts the copy in
    eval mode (``Module.eval()``: BatchNorm with the running statistics of the snapshot,
    no dropout): the ``hvp_grad_fn`` Eigen-SAM uses for its HVPs with BatchNorm, as
    ``sam_jax.train`` does.
    """
    graphdef, _, rest = nnx.split(model, wrt, ...)
    # A snapshot of the arrays. The split state holds the model's own Variable objects
    # and ``nnx.merge`` would reuse them: a perturbed pass on the merged copy would then
    # write its BatchNorm statistics (and RNG counts) back into the model. Pure arrays
    # make ``merge`` build fresh Variables.
    rest = nnx.as_pure(rest)
    diff = nnx.DiffState(0, wrt)

    def grad_fn(params):
        copy = nnx.merge(graphdef, params, rest)
        if eval_mode:
            copy.eval()
        result = nnx.grad(loss_fn, argnums=diff, has_aux=has_aux)(copy, *args)
        grads = result[0] if has_aux else result
        return nnx.as_pure(nnx.state(grads, wrt))

    return grad_fn


def nnx_value_and_grad_fn(loss_fn: Callable, model: nnx.Module, *args,
                          wrt: Any = nnx.Param, has_aux: bool = False):
    """Clean pass on an NNX model and the ``grad_fn`` that ``nnx.Optimizer.update`` forwards.

    ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``). Returns
    ``(value, grads, grad_fn)``:

    * ``value``, ``grads``: ``nnx.value_and_grad`` of ``loss_fn`` w.r.t. the ``wrt``
      variables at the model's current state. This is the clean pass: it updates the
      model in place as a training step does (BatchNorm running statistics, RNG
      counters).
    * ``grad_fn(params)``: :func:`nnx_grad_fn` from a snapshot taken *before* the
      clean pass: the gradient of the same loss on the same ``args`` at ``params`` (the
      pure parameter state ``nnx.Optimizer.update`` hands the transform), with the
      clean pass's dropout mask, writing nothing back: the model keeps the clean pass's
      BatchNorm statistics.

    ``wrt`` must be the optimizer's ``wrt`` (``nnx_update`` reads it from the optimizer).
    Works eagerly and inside ``nnx.jit``.
    """
    grad_fn = nnx_grad_fn(loss_fn, model, *args, wrt=wrt, has_aux=has_aux)
    diff = nnx.DiffState(0, wrt)
    value, grads = nnx.value_and_grad(loss_fn, argnums=diff, has_aux=has_aux)(model, *args)
    return value, grads, grad_fn


def nnx_update(optimizer: nnx.Optimizer, model: nnx.Module, loss_fn: Callable, *args,
               has_aux: bool = False, hvp_grad_fn: bool = False, **update_kwargs):
    """One training step of ``nnx.Optimizer`` from a loss: ``optimizer.update(model, grads, grad_fn=...)``.

    ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``); returns
    the clean loss (or ``(loss, aux)``). The model is updated in place: parameters by
    the optimizer, BatchNorm statistics and RNG counters by the clean pass only (see
    :func:`nnx_value_and_grad_fn`). ``hvp_grad_fn=True`` also passes the eval-mode
    gradient function (:func:`nnx_grad_fn` with ``eval_mode=True``, running statistics
    before this step) that Eigen-SAM uses for its HVPs on BatchNorm models.
    ``**update_kwargs`` go to the transform's ``update`` as well (e.g.
    ``learning_rate=``). Plain optax transforms ignore ``grad_fn``, so the same loop
    runs SGD. Call it inside ``nnx.jit`` for speed::

        @nnx.jit
        def train_step(model, optimizer, batch):
            return sam_jax.nnx_update(optimizer, model, loss_fn, batch)
    """
    if hvp_grad_fn:
        update_kwargs["hvp_grad_fn"] = nnx_grad_fn(loss_fn, model, *args, wrt=optimizer.wrt,
                                                   has_aux=has_aux, eval_mode=True)
    value, grads, grad_fn = nnx_value_and_grad_fn(loss_fn, model, *args, wrt=optimizer.wrt, has_aux=has_aux)
    if isinstance(optimizer.tx, optax.GradientTransformationExtraArgs):
        update_kwargs = {"grad_fn": grad_fn, **update_kwargs}
    # else: a transform without extra arguments (not a SAM-family member) cannot take them.
    optimizer.update(model, grads, **update_kwargs)
    return value
