"""matplotlib, imported when a figure is drawn: it is an optional extra."""

__all__ = ["axes", "pyplot"]


def pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "sklearn_lib.plotting needs matplotlib, an optional extra: "
            "pip install sklearn_lib[plot]"
        ) from error
    return plt


def axes(ax):
    """``ax``, or the axes of a new figure when None."""
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots()
    return ax
