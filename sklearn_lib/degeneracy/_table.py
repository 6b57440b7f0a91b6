"""A fitted :class:`~sklearn_lib.DegeneracyReport` as a table and a figure.

The per-layer rows that ``to_frame`` and ``plot`` share, read off the report's
fitted attributes: counts are ints, and missing (None) where a layer has no
pre-activations or no section into it.
"""

import numpy as np
from sklearn.utils.validation import check_is_fitted

__all__ = ["COLUMNS", "report_frame", "report_plot", "report_rows"]

COLUMNS = (
    "n_features", "activation_rank", "activation_null", "gradient_rank", "gradient_null",
    "effective_dim", "joint_null", "dead", "always_on", "sync_groups", "sync_group_sizes",
    "sync_directions", "section_parameters", "degenerate_parameters",
    "degenerate_parameters_error", "degenerate_parameters_method",
)


def _int_or_none(value):
    return None if np.isnan(value) else round(value)


def _float_or_none(value):
    return None if np.isnan(value) else float(value)


def report_rows(report):
    """``(layer name, {column: value})`` for every layer of a fitted report."""
    check_is_fitted(report)
    for l, name in enumerate(report.layer_names_):
        d, groups = int(report.n_features_[l]), report.synchronised_groups_[l]
        has = groups is not None
        yield name, {
            "n_features": d,
            "activation_rank": int(report.activation_rank_[l]),
            "activation_null": d - int(report.activation_rank_[l]),
            "gradient_rank": int(report.gradient_rank_[l]),
            "gradient_null": d - int(report.gradient_rank_[l]),
            "effective_dim": int(report.n_components_[l]),
            "joint_null": d - int(report.n_components_[l]),
            "dead": len(report.dead_neurons_[l]) if has else None,
            "always_on": len(report.always_on_neurons_[l]) if has else None,
            "sync_groups": len(groups) if has else None,
            "sync_group_sizes": tuple(len(g) for g in groups) if has else None,
            "sync_directions": _int_or_none(report.synchronised_directions_[l]),
            "section_parameters": _int_or_none(report.section_parameters_[l]),
            "degenerate_parameters": _int_or_none(report.degenerate_parameters_[l]),
            "degenerate_parameters_error": _float_or_none(
                report.degenerate_parameters_error_[l]),
            "degenerate_parameters_method": report.degenerate_parameters_method_[l],
        }


def report_frame(report):
    """The rows of :func:`report_rows` as a DataFrame (see ``DegeneracyReport.to_frame``)."""
    try:
        import pandas as pd
    except ImportError as error:
        raise ImportError(
            "DegeneracyReport.to_frame needs pandas, an optional extra: "
            "pip install sklearn_lib[all]"
        ) from error
    names, rows = zip(*report_rows(report))
    frame = pd.DataFrame(list(rows), index=pd.Index(names, name="layer"),
                         columns=list(COLUMNS))
    for column in COLUMNS:
        if column == "degenerate_parameters_error":
            frame[column] = frame[column].astype("Float64")
        elif column == "degenerate_parameters_method":
            frame[column] = frame[column].astype("string")
        elif column != "sync_group_sizes":
            frame[column] = frame[column].astype("Int64")
    return frame


def report_plot(report, ax=None):
    """The bars of ``DegeneracyReport.plot`` on ``ax`` (new axes when None)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "DegeneracyReport.plot needs matplotlib, an optional extra: "
            "pip install sklearn_lib[plot]"
        ) from error
    rows = dict(report_rows(report))
    if ax is None:
        _, ax = plt.subplots()
    bars = {
        "activations' null space": [r["activation_null"] for r in rows.values()],
        "gradients' null space": [r["gradient_null"] for r in rows.values()],
        "dropped by the basis (d - r)": [r["joint_null"] for r in rows.values()],
        "synchronised or dead neurons": [
            (sum(r["sync_group_sizes"]) + r["dead"]) if r["dead"] is not None else 0
            for r in rows.values()
        ],
    }
    x = np.arange(len(rows))
    width = 0.8 / len(bars)
    for k, (label, values) in enumerate(bars.items()):
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, [f"{name}\n(d = {r['n_features']})" for name, r in rows.items()])
    ax.set_ylabel("dimensions / neurons")
    ax.set_title("degeneracy per layer")
    ax.legend(fontsize="small")
    return ax
