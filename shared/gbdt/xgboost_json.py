"""The ensemble as an XGBoost JSON model, which ``xgboost.Booster(model_file=...)`` loads.

The layout is XGBoost's own (``doc/model.schema`` in its repository; the
fields as XGBoost 3.x writes them with ``Booster.save_model("m.json")``): a
``gbtree`` booster whose trees carry the ``RegTree`` arrays, the learner's
``base_score`` (a list, one value per class for softmax) and the objective.
aicfl writes no categorical splits: ``split_type`` is 0 everywhere and the
``categories*`` arrays are empty. Nothing here needs XGBoost installed.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from shared.gbdt.trees import Ensemble, Tree

FORMAT_VERSION = (3, 0, 0)  # the XGBoost release whose JSON layout this writes
_ROOT_PARENT = 2147483647  # XGBoost's parent of the root: INT32_MAX


def _number(value: float) -> str:
    # XGBoost writes its parameters as strings; shortest float32 text reads back to the same float32.
    return np.format_float_scientific(np.float32(value), unique=True, trim="-").upper()


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32).tolist()]


def _tree_json(tree: Tree, index: int, num_feature: int) -> dict[str, Any]:
    n = tree.n_nodes
    parents = tree.parent.astype(np.int64).copy()
    parents[parents < 0] = _ROOT_PARENT
    return {
        "base_weights": _floats(tree.base_weight),
        "categories": [],
        "categories_nodes": [],
        "categories_segments": [],
        "categories_sizes": [],
        "default_left": [int(v) for v in tree.default_left.tolist()],
        "id": index,
        "left_children": tree.left.astype(int).tolist(),
        "loss_changes": _floats(tree.loss_change),
        "parents": parents.tolist(),
        "right_children": tree.right.astype(int).tolist(),
        "split_conditions": _floats(tree.threshold),
        "split_indices": tree.feature.astype(int).tolist(),
        "split_type": [0] * n,
        "sum_hessian": _floats(tree.sum_hessian),
        "tree_param": {
            "num_deleted": "0",
            "num_feature": str(num_feature),
            "num_nodes": str(n),
            "size_leaf_vector": "1",
        },
    }


def _objective_json(ensemble: Ensemble) -> dict[str, Any]:
    name = ensemble.objective
    if name.startswith("multi:"):
        return {"name": name, "softmax_multiclass_param": {"num_class": str(ensemble.num_class)}}
    return {"name": name, "reg_loss_param": {"scale_pos_weight": "1"}}


def to_xgboost_json(ensemble: Ensemble) -> dict[str, Any]:
    """The model as XGBoost's JSON document (a dict; :func:`dumps` gives the bytes)."""
    outputs = ensemble.outputs
    rounds = len(ensemble.trees) // outputs
    base = "[" + ",".join(_number(s) for s in ensemble.base_score) + "]"
    return {
        "learner": {
            "attributes": {},
            "feature_names": [],
            "feature_types": [],
            "gradient_booster": {
                "model": {
                    "cats": {"enc": [], "feature_segments": [], "sorted_idx": []},
                    "gbtree_model_param": {"num_parallel_tree": "1", "num_trees": str(len(ensemble.trees))},
                    "iteration_indptr": [i * outputs for i in range(rounds + 1)],
                    "tree_info": list(ensemble.tree_class),
                    "trees": [_tree_json(t, i, ensemble.num_feature) for i, t in enumerate(ensemble.trees)],
                },
                "name": "gbtree",
            },
            "learner_model_param": {
                "base_score": base,
                "boost_from_average": "1",
                "num_class": str(ensemble.num_class),
                "num_feature": str(ensemble.num_feature),
                "num_target": "1",
            },
            "objective": _objective_json(ensemble),
        },
        "version": list(FORMAT_VERSION),
    }


def dumps(ensemble: Ensemble) -> bytes:
    """The model as the bytes of an XGBoost ``.json`` file (``Booster().load_model(bytearray(...))`` reads them)."""
    return json.dumps(to_xgboost_json(ensemble), separators=(",", ":")).encode()
