"""Servables of the backbones that are not dot-product models: NeuMF, MultVAE, CDAE.

Their masked tables are :class:`export.tables.ServedTable` s; every other layer and weight
(MLPs, biases, the VAE's encoder/decoder) is the Keras model's own, called as the model calls
it, and saved with the servable.

* :class:`NeuMFServable` (``neumf``)::

    serving_default  user_id ID[B]               -> item_ids ID[B, k], scores float32[B, k], known bool[B]
    score            user_id ID[B], item_id ID[B] -> scores float32[B] (the logit), known bool[B]

  ``serving_default`` runs the GMF + MLP head over every item for each user of the batch
  (one user at a time, so memory stays ``O(items · width)``), then the top-k.

* :class:`AutoencoderServable` (``multvae``, ``cdae``): the user's interaction history is
  the input, so users unseen in training are served too::

    serving_default  history ID[B, L] (CDAE also user_id ID[B]) -> item_ids, scores, known

  ``history`` is padded to a common length ``L`` with any id not in the data (the
  unknown-id of the warmup requests, e.g. ``-1`` or ``""``): unknown ids are ignored.
  ``known`` is false for a row without any known item (CDAE: and an unknown user), which
  then gets the most popular items with score 0. CDAE's user vector is zero for unknown
  users. With ``exclude_seen`` the history's items are never returned.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from export.builder import Servable
from export.tables import ExportError, ServedTable


def _tables(model, names: list[str], fmt: str, values: str, scoring: dict) -> dict:
    out = {}
    for attr in names:
        layer = getattr(model, attr)
        out[layer.name] = ServedTable(layer, fmt, values, scoring.get(attr, "rebuild"), name=attr)
    return out


class NeuMFServable(Servable):
    kind = "neumf"
    signature_names = ("serving_default", "score")

    def __init__(self, model, *, fmt="compact", values="float32", item_matrix="cache", k=20,
                 item_popularity=None, user_ids=None, item_ids=None, seen=None, interactions=None):
        del interactions  # not needed
        scoring = "cache" if item_matrix == "cache" else "rebuild"  # every item's rows: decoded, never sparse
        names = ["user_gmf", "item_gmf", "user_mlp", "item_mlp"]
        tables = _tables(model, names, fmt, values, {"item_gmf": scoring, "item_mlp": scoring})
        super().__init__(tables=tables, num_users=model.num_users, num_items=model.num_items, k=k,
                         item_popularity=item_popularity, user_ids=user_ids, item_ids=item_ids, fmt=fmt,
                         values=values, item_matrix=scoring if fmt == "compact" else "dense", seen=seen)
        self.t = dict(zip(names, tables.values()))
        self.__dict__["_model"] = model  # its Dense layers run as they are; their variables are saved
        self.weights = [w for layer in (model.first_user, model.first_item, model.mlp, model.head)
                        for w in layer.weights]
        users, items = self.user_map.spec("user_id"), self.item_map.spec("item_id")
        self.serving_default = tf.function(self._recommend, input_signature=[users])
        self.score = tf.function(self._score, input_signature=[users, items])

    def _logits(self, gmf_user, first_user, gmf_items, first_items):
        """``NeuMF._logits`` for one user ``[d]``, ``[h]`` against items ``[n, d]``, ``[n, h]``."""
        m = self.__dict__["_model"]
        mlp = m.mlp(tf.nn.relu(first_user[None, :] + first_items))
        return tf.squeeze(m.head(tf.concat([gmf_user[None, :] * gmf_items, mlp], -1)), -1)

    def _user_side(self, users):
        m = self.__dict__["_model"]
        return self.t["user_gmf"].lookup(users), m.first_user(self.t["user_mlp"].lookup(users))

    def _recommend(self, user_id):
        m = self.__dict__["_model"]
        users = self.user_map.dense(user_id)
        gmf_u, first_u = self._user_side(users)
        gmf_i, first_i = self.t["item_gmf"].full(), m.first_item(self.t["item_mlp"].full())
        scores = tf.map_fn(lambda row: self._logits(row[0], row[1], gmf_i, first_i), (gmf_u, first_u),
                           fn_output_signature=tf.TensorSpec([self.num_items], tf.float32), parallel_iterations=2)
        if self.exclude_seen:
            scores = self._drop_seen(users, scores)
        return self._top(scores, users >= 0)

    def _score(self, user_id, item_id):
        m = self.__dict__["_model"]
        users, items = self._pairs(user_id, item_id)
        gmf_u, first_u = self._user_side(users)
        gmf_i, first_i = self.t["item_gmf"].lookup(items), m.first_item(self.t["item_mlp"].lookup(items))
        mlp = m.mlp(tf.nn.relu(first_u + first_i))
        logits = tf.squeeze(m.head(tf.concat([gmf_u * gmf_i, mlp], -1)), -1)
        known = tf.logical_and(users >= 0, items >= 0)
        return {"scores": tf.where(known, logits, tf.zeros_like(logits)), "known": known}

    def warmup_inputs(self, batch, rng):
        return self._retrieval_warmup(batch, rng)

    def reference(self, model, rng):
        users = np.unique(rng.integers(0, self.num_users, size=min(self.num_users, 16))).astype(np.int64)
        return {"user_id": self.user_map.raw_ids[users]}, self._reference_seen(users, model.score_all(users).numpy())


class AutoencoderServable(Servable):
    """MultVAE (``model.latent``, ``model.decoder``) or CDAE (``model.user_table``)."""

    signature_names = ("serving_default",)

    def __init__(self, model, *, fmt="compact", values="float32", item_matrix="cache", k=20,
                 item_popularity=None, user_ids=None, item_ids=None, seen=None, interactions=None):
        self.cdae = hasattr(model, "user_table")
        names = ["item_input", "item_output"] + (["user_table"] if self.cdae else [])
        tables = _tables(model, names, fmt, values, {"item_output": item_matrix})
        super().__init__(tables=tables, num_items=model.num_items, k=k, item_popularity=item_popularity,
                         item_ids=item_ids, fmt=fmt, values=values,
                         item_matrix=item_matrix if fmt == "compact" else "dense",
                         num_users=model.num_users if self.cdae else None, user_ids=user_ids if self.cdae else None)
        self.kind = "cdae" if self.cdae else "multvae"
        self.exclude_seen = seen is not None  # the request's history is what was seen
        self.t = dict(zip(names, tables.values()))
        self.__dict__["_model"] = model
        self.__dict__["_interactions"] = interactions
        layers = [] if self.cdae else [model.latent, model.decoder]
        self.weights = [model.input_bias, model.output_bias] + [w for layer in layers for w in layer.weights]
        history = self.item_map.spec("history", (None, None))
        if self.cdae:
            users = self.user_map.spec("user_id")
            self.serving_default = tf.function(self._recommend, input_signature=[history, users])
        else:
            self.serving_default = tf.function(lambda history: self._recommend(history), input_signature=[history])

    def _recommend(self, history, user_id=None):
        m = self.__dict__["_model"]
        dense = self.item_map.dense(history)
        batch = tf.shape(dense, out_type=tf.int64)[0]
        present = dense >= 0
        where = tf.where(present)
        rows, items = where[:, 0], tf.gather_nd(dense, where)
        weights = tf.ones_like(items, tf.float32)
        if not self.cdae:  # MultVAE: L2-normalised history, as _encode_history(normalize=True)
            norm = tf.math.unsorted_segment_sum(tf.square(weights), rows, batch)
            weights = weights * tf.gather(tf.math.rsqrt(tf.maximum(norm, 1e-12)), rows)
        pre = tf.math.unsorted_segment_sum(weights[:, None] * self.t["item_input"].lookup(items), rows, batch)
        known = tf.reduce_any(present, axis=1)
        if self.cdae:
            users = self.user_map.dense(user_id)
            hidden = tf.sigmoid(pre + self.t["user_table"].lookup(users) + m.input_bias)
            known = tf.logical_or(known, users >= 0)
        else:
            mu, _ = tf.split(m.latent(tf.tanh(pre + m.input_bias)), 2, -1)
            hidden = m.decoder(mu)
        scores = self.t["item_output"].scores(hidden) + m.output_bias
        if self.exclude_seen:
            low = tf.fill(tf.shape(items), tf.float32.min)
            scores = tf.tensor_scatter_nd_update(scores, tf.stack([rows, items], 1), low)
        return self._top(scores, known)

    def warmup_inputs(self, batch, rng):
        pad = self.item_map.unknown_id()
        history = self.item_map.sample(rng, batch * 5, unknown=False).reshape(batch, 5)
        history[-1, -2:] = pad  # padding is ignored
        inputs = {"history": history}
        if self.cdae:
            inputs["user_id"] = self.user_map.sample(rng, batch, unknown=True)
        return {"serving_default": inputs}

    def reference(self, model, rng):
        """Training users' histories (the interactions the model was given)."""
        train = self.__dict__["_interactions"]
        if train is None:
            raise ExportError(f"checking a {self.kind} servable needs interactions= (the training CSR)")
        train = train.tocsr()
        users = np.unique(rng.integers(0, train.shape[0], size=min(train.shape[0], 32))).astype(np.int64)
        users = users[np.diff(train.indptr)[users] > 0]
        lengths = np.diff(train.indptr)[users]
        history = np.full((len(users), int(lengths.max())), self.item_map.unknown_id(), self.item_map.raw_ids.dtype)
        for row, user in enumerate(users):
            items = train.indices[train.indptr[user]:train.indptr[user + 1]]
            history[row, : lengths[row]] = self.item_map.raw_ids[items]
        inputs = {"history": history}
        if self.cdae:
            inputs["user_id"] = self.user_map.raw_ids[users]
        scores = model.score_all(users).numpy()
        if self.exclude_seen:
            scores[train[users].nonzero()] = np.finfo(np.float32).min
        return inputs, scores
