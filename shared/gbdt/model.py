"""A boosted model as the registry stores it, and a round's unfinished trees as devices are told them.

A version of a ``[model] zoo = "gbdt"`` job is not a float32 vector of parameters but the bytes of
one JSON document (:data:`FORMAT`): the bin edges every device maps its values with and the
ensemble so far, in aicfl's own arrays (:class:`~shared.gbdt.trees.Ensemble`). The registry keeps
those bytes as a uint8 vector under the usual signed header; :func:`to_xgboost` turns them into
the XGBoost JSON model that ``xgboost.Booster`` loads. Between the levels of a boosting round the
coordinator keeps the round's trees so far (:class:`~shared.gbdt.growth.Growth`), which each level
round's task carries to the devices (:func:`growth_to_json`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from shared.gbdt.binning import BinEdges
from shared.gbdt.growth import Growth, Node
from shared.gbdt.trees import Ensemble, Tree
from shared.gbdt.xgboost_json import dumps

FORMAT = "aicfl-gbdt-v1"
_TREE_DTYPES = {
    "left": np.int32,
    "right": np.int32,
    "parent": np.int32,
    "feature": np.int32,
    "split_bin": np.int32,
    "threshold": np.float32,
    "default_left": bool,
    "base_weight": np.float32,
    "loss_change": np.float32,
    "sum_hessian": np.float32,
}


class ModelFormatError(ValueError):
    """Bytes that are not a boosted model of :data:`FORMAT`."""


@dataclass(frozen=True, eq=False)
class BoostedModel:
    """What a version holds: the bin edges and the ensemble."""

    edges: BinEdges
    ensemble: Ensemble


def _tree_json(tree: Tree) -> dict[str, list[Any]]:
    return {name: np.asarray(getattr(tree, name)).tolist() for name in _TREE_DTYPES}


def _tree_from(d: dict[str, Any]) -> Tree:
    return Tree(**{name: np.asarray(d[name], dtype=dtype) for name, dtype in _TREE_DTYPES.items()})


def to_bytes(model: BoostedModel) -> bytes:
    """The version's content (compact JSON, UTF-8)."""
    e = model.ensemble
    doc = {
        "format": FORMAT,
        "bins": model.edges.bins,
        "edges": [cut.astype(np.float32).tolist() for cut in model.edges.edges],
        "objective": e.objective,
        "base_score": list(e.base_score),
        "num_feature": e.num_feature,
        "num_class": e.num_class,
        "tree_class": list(e.tree_class),
        "trees": [_tree_json(t) for t in e.trees],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def from_bytes(data: bytes | np.ndarray) -> BoostedModel:
    """The model of :func:`to_bytes` (or of its uint8 vector); :class:`ModelFormatError` otherwise."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ModelFormatError(f"not a boosted model (expected format {FORMAT!r})")
        edges = BinEdges(
            edges=tuple(np.asarray(cut, dtype=np.float32) for cut in doc["edges"]), bins=int(doc["bins"])
        )
        ensemble = Ensemble(
            objective=str(doc["objective"]),
            base_score=tuple(float(v) for v in doc["base_score"]),
            num_feature=int(doc["num_feature"]),
            num_class=int(doc["num_class"]),
            trees=tuple(_tree_from(t) for t in doc["trees"]),
            tree_class=tuple(int(k) for k in doc["tree_class"]),
        )
    except ModelFormatError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFormatError(f"not a valid boosted model: {type(err).__name__}: {err}") from None
    if len(ensemble.trees) != len(ensemble.tree_class) or edges.n_features != ensemble.num_feature:
        raise ModelFormatError("a boosted model's trees, classes and edges do not agree")
    return BoostedModel(edges, ensemble)


def to_vector(model: BoostedModel) -> np.ndarray:
    """The content as the uint8 vector the registry stores and signs."""
    return np.frombuffer(to_bytes(model), dtype=np.uint8).copy()


def to_xgboost(data: bytes | np.ndarray) -> bytes:
    """A stored version's content as an XGBoost JSON model (``Booster().load_model(bytearray(...))``)."""
    return dumps(from_bytes(data).ensemble)


def growth_to_json(growth: Growth) -> dict[str, Any]:
    """The round's trees so far and its open slots, as JSON (a root's unknown sums as null)."""

    def node(n: Node) -> dict[str, Any]:
        d = asdict(n)
        for k in ("grad", "hess"):
            if isinstance(d[k], float) and math.isnan(d[k]):
                d[k] = None
        return d

    return {
        "trees": [[node(n) for n in tree] for tree in growth.trees],
        "open": [list(slot) for slot in growth.open],
        "depth": growth.depth,
    }


def growth_from_json(d: dict[str, Any]) -> Growth:
    """The inverse of :func:`growth_to_json`; ``ValueError`` for anything else."""
    try:
        trees = tuple(
            tuple(
                Node(
                    **{
                        **n,
                        "grad": math.nan if n.get("grad") is None else float(n["grad"]),
                        "hess": math.nan if n.get("hess") is None else float(n["hess"]),
                    }
                )
                for n in tree
            )
            for tree in d["trees"]
        )
        open_ = tuple((int(t), int(nid)) for t, nid in d["open"])
        growth = Growth(trees=trees, open=open_, depth=int(d["depth"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not a growth state: {type(err).__name__}: {err}") from None
    for t, nid in growth.open:
        if not (0 <= t < len(trees) and 0 <= nid < len(trees[t])):
            raise ValueError(f"open slot {(t, nid)} names no node")
    return growth
