"""Training methods as objects: one per method, all called the same way by ``trainers.train``.

A method decides which embedding tables the trained model has (:meth:`Method.build`),
how often its masks change (:meth:`Method.mask_update_every`, for MAC accounting), from
which epoch its model is at its final sparsity (:meth:`Method.selectable_from`, for early
stopping) and how it fits (:meth:`Method.fit`: callbacks, phases, what happens after
``fit``). It returns the trained model with ``MaskedEmbedding`` tables, the ``History`` objects and the
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
    """The planned length the schedules run over: ``schedule_epochs × steps_per_epoch``
    (``cfg.epochs`` may stop the fit earlier: the retrain after early stopping)."""
    update_interval: int
    build: Callable[[EmbeddingFactory | None], Recommender]
    log_dir: str | None = None
    steps_per_epoch: int = 1

    @property
    def planned_epochs(self) -> int:
        return self.total_steps // self.steps_per_epoch


class Method:
    """Base class: dense training with ``MaskedEmbedding`` tables (masks stay all ones)."""

    name = "dense"

    def build(self, ctx: Context) -> Recommender:
        return ctx.build(None)

    def mask_update_every(self, ctx: Context) -> int:
        return ctx.update_interval

    def selectable_from(self, ctx: Context) -> int:
        """First epoch (1-based) after which the model is at its final sparsity: early
        stopping may choose only from there."""
        return 1

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
        return ctx.build(compact_factory(cfg.sparsity, self.growth_scores(cfg.growth_scores)))

    def growth_scores(self, requested: str) -> str:
        """The compact tables' ``growth_scores`` for ``--growth-scores requested``: ``"none"``
        unless this method's growth reads scores (RP and SET keep none). ``trainers.runs``
        rebuilds a run's tables with it."""
        return requested if self.growth in ("gradient", "momentum") else "none"

    def callback(self, ctx: Context) -> dsl_tf.DynamicSparsity:
        cfg = ctx.cfg
        return dsl_tf.DynamicSparsity(
            sparsity=cfg.sparsity, update_interval=ctx.update_interval, initial_update_ratio=cfg.initial_update_ratio,
            decay=cfg.decay, growth=self.growth, seed=cfg.seed, log_dir=ctx.log_dir,
            end_step=max(1, round(cfg.explore_until * ctx.total_steps)), prune_by=cfg.prune_by,
            grow_by=cfg.grow_by, budget=cfg.budget,
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

    def selectable_from(self, ctx):
        return self.schedule(ctx).end_step // ctx.steps_per_epoch + 1  # TFMOT prunes to s during step end_step

    def fit(self, model, ctx, fit, callbacks):
        history = [fit(epochs=ctx.cfg.epochs, callbacks=callbacks + [tfmot.sparsity.keras.UpdatePruningStep()])]
        masked = ctx.build(None)
        baselines.gmp_to_masked(model, masked)
        return masked, history, None


class OneShotMagnitudePruning(Method):
    """OMP: dense training, one-shot magnitude pruning, fine-tuning with the mask fixed."""

    name = "omp"

    def dense_epochs(self, ctx: Context) -> int:
        """Epochs trained dense: ``omp_dense_fraction`` of the planned epochs, at least one
        dense and one fine-tuning epoch."""
        planned = ctx.planned_epochs
        return min(planned - 1, max(1, round(ctx.cfg.omp_dense_fraction * planned)))

    def selectable_from(self, ctx):
        return self.dense_epochs(ctx) + 1

    def fit(self, model, ctx, fit, callbacks):
        cfg = ctx.cfg
        dense_epochs = self.dense_epochs(ctx)
        if cfg.epochs <= dense_epochs:
            raise ValueError(f"method 'omp' trains {dense_epochs} dense epochs (of {ctx.planned_epochs} planned): "
                             f"epochs must exceed it, got {cfg.epochs}")
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
