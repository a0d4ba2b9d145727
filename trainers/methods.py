"""Training methods as objects: one per method, all called the same way by ``trainers.train``.

A method decides which embedding tables the trained model has (:meth:`Method.build`),
how often its masks change (:meth:`Method.mask_update_every`, for MAC accounting) and how
it fits (:meth:`Method.fit`: callbacks, phases, what happens after ``fit``). It returns
the trained model with ``MaskedEmbedding`` tables, the ``History`` objects and the
``DynamicSparsity`` callback if one ran. Adding a method touches this module only.

>>> sorted(METHODS)
['dense', 'dsl', 'gmp', 'omp', 'rp', 'set']
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import dsl_tf
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from trainers import baselines
from trainers.models import EmbeddingFactory, Recommender


@dataclasses.dataclass
class Context:
    """What a method needs to know about the run (built by ``trainers.train``)."""

    cfg: "object"  # trainers.train.TrainConfig (not imported: train imports this module)
    total_steps: int
    update_interval: int
    build: Callable[[EmbeddingFactory | None], Recommender]
    log_dir: str | None = None


class Method:
    """Base class: dense training with ``MaskedEmbedding`` tables (masks stay all ones)."""

    name = "dense"

    def build(self, ctx: Context) -> Recommender:
        return ctx.build(None)

    def mask_update_every(self, ctx: Context) -> int:
        return ctx.update_interval

    def fit(self, model: Recommender, ctx: Context, fit: Callable, callbacks: list
            ) -> tuple[Recommender, list, dsl_tf.DynamicSparsity | None]:
        """Train ``model`` with ``fit(epochs=..., callbacks=..., initial_epoch=...)``."""
        return model, [fit(epochs=ctx.cfg.epochs, callbacks=callbacks)], None


class DynamicSparse(Method):
    """DSL, RP and SET: :class:`dsl_tf.DynamicSparsity` with one growth rule, on compact
    (``CompactMaskedEmbedding``, the default) or dense-mask tables (``--storage``)."""

    def __init__(self, name: str, growth: str):
        self.name, self.growth = name, growth

    def build(self, ctx: Context) -> Recommender:
        cfg = ctx.cfg
        if cfg.storage == "dense":
            return ctx.build(None)
        scores = cfg.growth_scores if self.growth in ("gradient", "momentum") else "none"
        return ctx.build(compact_factory(cfg.sparsity, scores))

    def callback(self, ctx: Context) -> dsl_tf.DynamicSparsity:
        cfg = ctx.cfg
        return dsl_tf.DynamicSparsity(
            sparsity=cfg.sparsity, update_interval=ctx.update_interval, initial_update_ratio=cfg.initial_update_ratio,
            decay=cfg.decay, growth=self.growth, seed=cfg.seed, log_dir=ctx.log_dir,
        )

    def fit(self, model, ctx, fit, callbacks):
        sparsity = self.callback(ctx)
        return model, [fit(epochs=ctx.cfg.epochs, callbacks=callbacks + [sparsity])], sparsity


class GradualMagnitudePruning(Method):
    """GMP with TF Model Optimization (``prune_low_magnitude`` + ``PolynomialDecay``), then
    copied into a ``MaskedEmbedding`` model (:func:`trainers.baselines.gmp_to_masked`)."""

    name = "gmp"

    def schedule(self, ctx: Context) -> tfmot.sparsity.keras.PolynomialDecay:
        cfg = ctx.cfg
        return baselines.gmp_schedule(cfg.sparsity, ctx.total_steps, ctx.update_interval, cfg.gmp_end_fraction)

    def build(self, ctx):
        return ctx.build(baselines.gmp_embedding_factory(self.schedule(ctx)))

    def mask_update_every(self, ctx):
        return self.schedule(ctx).frequency

    def fit(self, model, ctx, fit, callbacks):
        history = [fit(epochs=ctx.cfg.epochs, callbacks=callbacks + [tfmot.sparsity.keras.UpdatePruningStep()])]
        masked = ctx.build(None)
        baselines.gmp_to_masked(model, masked)
        return masked, history, None


class OneShotMagnitudePruning(Method):
    """OMP: dense training, one-shot magnitude pruning, fine-tuning with the mask fixed."""

    name = "omp"

    def fit(self, model, ctx, fit, callbacks):
        cfg = ctx.cfg
        dense_epochs = min(cfg.epochs - 1, max(1, round(cfg.omp_dense_fraction * cfg.epochs)))
        history = [fit(epochs=dense_epochs, callbacks=callbacks)]
        baselines.omp_prune(model, cfg.sparsity, cfg.seed, model.optimizer)
        keep_fixed = dsl_tf.DynamicSparsity(sparsity=cfg.sparsity, update_interval=ctx.total_steps + 1,
                                            growth="none", seed=cfg.seed)
        history.append(fit(epochs=cfg.epochs, initial_epoch=dense_epochs, callbacks=callbacks + [keep_fixed]))
        return model, history, keep_fixed


def compact_factory(sparsity: float, growth_scores: str) -> EmbeddingFactory:
    """Embedding factory of ``CompactMaskedEmbedding`` tables at ``sparsity``."""

    def factory(input_dim: int, output_dim: int, name: str, **kwargs) -> tf.keras.layers.Layer:
        return dsl_tf.CompactMaskedEmbedding(input_dim, output_dim, sparsity=sparsity, growth_scores=growth_scores,
                                             name=name, **kwargs)

    return factory


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(),
        DynamicSparse("dsl", "gradient"),
        DynamicSparse("rp", "none"),
        DynamicSparse("set", "random"),
        GradualMagnitudePruning(),
        OneShotMagnitudePruning(),
    )
}
