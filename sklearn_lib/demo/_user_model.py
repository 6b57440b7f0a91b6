"""The main job on a user's model: ``python -m sklearn_lib --model module:factory ...``.

The same comparison as :mod:`sklearn_lib.demo` (the interaction basis beside
PCA: directions and edges to keep, Gini, modularity), on any torch model named
by an importable factory and layers named as in :func:`~sklearn_lib.collect.collect`::

    python -m sklearn_lib --model mypkg.models:make_net --layers 0 2 4 \\
        --data inputs.npy [--labels labels.npy] [--sequence]

``--data`` is a ``.npy`` array of model inputs (one sample per row) or a
``.npz`` of arrays passed as keyword inputs (Hugging Face: ``input_ids``).
The first ``--n-fit`` samples fit the graphs, the next ``--n-eval`` are
scored. Without ``--labels`` the score is agreement with the unablated
model's own predictions (the argmax of its output; the last position's for a
``(batch, position, classes)`` output). Every argument, the model and its
layers are checked before any work: the data must be numbers without NaN or
infinity in either part, a ``.npz``'s keys must be inputs of the model's
``forward``, the model must run on the first samples of the data, and the
labels (a ``.npy``, or a ``.npz`` of one array) must be one integer per
sample. The ablations run the model itself with a
layer's activation replaced through a hook, so everything downstream of a
layer must flow through it (a residual stream, not a branch of it).
"""

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..graph._graph import InteractionGraph
from ..models import _adapters
from ..models._collect import prepare_model, record_activations
from ..models._model import _hooks, _parse_layers, _run_until_stopped, _StopForward
from ..utils._atomic import check_target, make_temp_dir, replace_dir

METHODS = ("LIB", "PCA")


# --------------------------------------------------------------------------- arguments
def load_factory(text):
    """The model built by ``module:factory`` (a module path, or a ``.py`` file, and a callable)."""
    module_name, sep, attr = text.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must be 'module:factory' (e.g. 'mypkg.nets:make'), got {text!r}.")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None:
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
        raise ValueError(f"--model: cannot import {module_name!r}: {exc}.") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model: {module_name!r} has no callable {attr!r}.")
    return _adapters.unwrap_model(factory())


def load_data(path):
    """A ``.npy`` array, or a ``.npz`` as a dict of arrays (keyword inputs)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path!r} as a .npy or .npz file without pickles: {exc}")
    if isinstance(loaded, np.ndarray):
        if loaded.ndim == 0:
            raise ValueError(f"{path!r} holds a scalar; expected one sample per row.")
        return loaded
    data = {key: loaded[key] for key in loaded.files}
    _adapters.check_dict_data(data)
    return data


def _n(data):
    return _adapters.check_dict_data(data) if isinstance(data, dict) else len(data)


def _arrays(data):
    """``(name in messages, array)`` of every array of ``--data``."""
    if isinstance(data, dict):
        return [(f"--data[{key!r}]", value) for key, value in data.items()]
    return [("--data", data)]


def check_data(data, n_fit, n_used):
    """Refuse arrays that are not numbers, and NaN or infinity in a used sample, naming it."""
    for name, array in _arrays(data):
        if array.dtype.kind not in "biuf":
            raise ValueError(
                f"{name} holds values of dtype {array.dtype}, not real numbers; save the "
                "model's inputs as a numeric array."
            )
        if array.dtype.kind != "f" or array.size == 0:
            continue
        finite = np.isfinite(array[:n_used].reshape(min(len(array), n_used), -1)).all(axis=1)
        if not finite.all():
            sample = int(np.flatnonzero(~finite)[0])
            problem = "NaN" if np.isnan(array[sample]).any() else "an infinite value"
            part = ("the fitting part" if sample < n_fit else "the evaluation part")
            raise ValueError(
                f"{name} holds {problem} in sample {sample} (in {part}; "
                f"{int((~finite).sum())} such samples in all). The graphs and the scores "
                "need finite inputs: remove or impute those samples."
            )


def check_model_runs(model, layers, data):
    """The model takes ``data``'s keys and runs on its first samples; else ValueError."""
    if isinstance(data, dict):
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # a forward without a signature: let the run tell
            parameters = None
        if parameters is not None and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            unknown = [key for key in data if key not in parameters]
            if unknown:
                raise ValueError(
                    f"--data is a .npz whose arrays are passed as keyword inputs, but "
                    f"{unknown} are not parameters of the model's forward"
                    f"{inspect.signature(model.forward)}; remove them from the .npz (or save "
                    "the single input as a .npy)."
                )
    probe = (_adapters.take(data, slice(0, 2)) if isinstance(data, dict) else data[:2])
    try:
        with torch.no_grad():
            record_activations(model, layers, _model_inputs(probe, model), verbose=False)
    except Exception as exc:  # noqa: BLE001 - whatever the user's model raises is reported
        shapes = ", ".join(f"{name}: shape {a.shape}, dtype {a.dtype}"
                           for name, a in _arrays(data))
        hint = ""
        param = next(model.parameters(), None)
        if (param is not None and param.is_floating_point()
                and any(a.dtype.kind in "biu" for _, a in _arrays(data))):
            hint = (" The data are integers while the model computes in floats: if they are "
                    "features rather than token ids, save them as floats.")
        raise ValueError(
            f"the model does not run on the first samples of --data ({shapes}): "
            f"{type(exc).__name__}: {exc}.{hint} Check that --data holds the model's inputs, "
            "one sample per row, with the shape (width, features) the model expects."
        ) from None


def load_labels(path, total, n_eval):
    """Integer labels of every sample or of the evaluation samples, from a .npy or a .npz."""
    if not os.path.isfile(path):
        raise ValueError(f"--labels: no such file {path!r}.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--labels: cannot read {path!r} as a .npy or .npz file without pickles: {exc}"
        ) from None
    if not isinstance(loaded, np.ndarray):
        with loaded:
            keys = list(loaded.files)
            if len(keys) != 1:
                raise ValueError(
                    f"--labels: {path!r} is a .npz with the arrays {keys}; expected one array "
                    "of integer labels (a .npy, or a .npz that holds exactly one array)."
                )
            loaded = loaded[keys[0]]
    if loaded.shape != (total,) and loaded.shape != (n_eval,):
        raise ValueError(
            f"--labels must hold one integer per sample of --data ({total}) or of "
            f"the evaluation ({n_eval}), got shape {loaded.shape}."
        )
    if loaded.dtype.kind not in "iu":
        detail = ""
        if loaded.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(loaded) | (loaded != np.round(loaded)))
            if bad.size:
                detail = f"; sample {int(bad[0])} holds {loaded[bad[0]]!r}"
        raise ValueError(
            f"--labels must hold integer class labels, got dtype {loaded.dtype}{detail}. "
            "Save them as integers (labels.astype(int) if they are whole numbers)."
        )
    return loaded


# --------------------------------------------------------------------------- the model
def _output(out):
    """A model output as (batch, classes): the first tensor; a sequence's last position."""
    value, _ = _adapters.first_tensor(out)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the model returned a {type(value).__name__}, not a tensor.")
    return value[:, -1] if value.ndim == 3 else value.reshape(value.shape[0], -1)


class _Downstream:
    """The model from a layer on, on the evaluation inputs: ``f(activations) -> output``.

    Evaluation calls it with the activations of the first samples (a probe),
    of all ``n`` inputs, or of ``m`` ablated copies of them stacked (``m n``
    rows, sample by sample): the
    model runs on the inputs once per copy with the layer's activation replaced
    (a hook), to the model's output or to the layer ``stop``'s activation.
    """

    def __init__(self, model, layer, inputs, stop=None):
        self.model, self.layer, self.inputs, self.stop = model, layer, inputs, stop
        self.n = _adapters.n_samples(inputs)

    def __call__(self, acts):
        param = next(self.model.parameters())
        acts = torch.as_tensor(acts).to(device=param.device, dtype=param.dtype)
        rows = acts.shape[0]
        if rows < self.n:
            # Evaluation probes a section with the first few samples.
            return self._run(acts, _adapters.take(self.inputs, slice(0, rows)))
        copies, rest = divmod(rows, self.n)
        if rest:
            raise ValueError(
                f"expected the first samples or a multiple of the {self.n} evaluation "
                f"samples, got {rows} rows: call the ablations with batch_size=len(X)."
            )
        return torch.cat([self._run(acts[i * self.n:(i + 1) * self.n], self.inputs)
                          for i in range(copies)])

    def _run(self, act, inputs):
        state = {}

        def stop(value):
            state["out"] = value
            raise _StopForward

        pairs = [(self.layer, lambda value: act.reshape(value.shape))]
        if self.stop is not None:
            pairs.append((self.stop, stop))
            with _hooks(pairs):
                _run_until_stopped(self.model, inputs)
            return state["out"]
        with _hooks(pairs):
            return _output(_adapters.call(self.model, inputs))


# --------------------------------------------------------------------------- the job
def _compare(model, layers, X_fit, X_eval, y, *, sequence, tolerance, resolution, verbose):
    specs = _parse_layers(model, layers, "output")
    start = time.perf_counter()
    graphs = {
        "LIB": InteractionGraph(verbose=False).fit_model(model, layers, X_fit, sequence=sequence),
        "PCA": InteractionGraph(basis="pca", verbose=False).fit_model(
            model, layers, X_fit, sequence=sequence),
    }
    if verbose:
        print(f"interaction graphs built in {time.perf_counter() - start:.1f} s; "
              "evaluating ...", flush=True)
    eval_acts = record_activations(model, layers, X_eval, verbose=False)
    n = _n(X_eval)
    rest = [_Downstream(model, s, X_eval) for s in specs]
    section = [_Downstream(model, a, X_eval, stop=b) for a, b in zip(specs[:-1], specs[1:])]
    from ._main import _score_graph

    acts = [eval_acts[layer] for layer in layers]
    return {name: _score_graph(name, graph, acts, y, section, rest, tolerance=tolerance,
                               resolution=resolution, batch_size=n)[0]
            for name, graph in graphs.items()}


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m sklearn_lib --model",
        description="Local interaction basis vs PCA on your own model.",
    )
    parser.add_argument("--model", required=True,
                        help="'module:factory' or 'file.py:factory'; factory() returns the model")
    parser.add_argument("--layers", nargs="+", required=True,
                        help="layer names in forward order (module paths or hook names)")
    parser.add_argument("--data", required=True,
                        help=".npy of inputs, or .npz of keyword inputs (one sample per row)")
    parser.add_argument("--labels", help=".npy of integer labels of the evaluation samples")
    parser.add_argument("--sequence", action="store_true",
                        help="activations are (batch, position, feature); positions count "
                             "as samples")
    parser.add_argument("--n-fit", type=int, help="samples to fit (default: half the data)")
    parser.add_argument("--n-eval", type=int, help="samples to score (default: the rest)")
    parser.add_argument("--tolerance", type=float, default=0.001,
                        help="allowed score drop, in [0, 1) (default 0.001)")
    parser.add_argument("--resolution", type=float, default=1.0,
                        help="Leiden resolution, positive (default 1.0)")
    parser.add_argument("--output", default="sklearn_lib_model",
                        help="output folder for comparison.json; if an earlier run wrote it, "
                             "<output>-2 (-3, ...) is written instead, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", dest="verbose", action="store_false")
    return parser


def _checked(parser, args):
    """Model, layers, data, labels and sizes, every one checked before any work."""
    from . import _main as demo

    for name in ("tolerance", "resolution"):
        try:
            demo._check_argument(name, getattr(args, name))
        except ValueError as exc:
            parser.error(str(exc))
    try:
        model = prepare_model(load_factory(args.model), dtype="float64")
        _parse_layers(model, args.layers, "output")
        if len(args.layers) < 2:
            raise ValueError(f"--layers needs at least 2 layers, got {args.layers}.")
        data = load_data(args.data)
        total = _n(data)
        n_fit = total // 2 if args.n_fit is None else args.n_fit
        n_eval = total - n_fit if args.n_eval is None else args.n_eval
        if not (2 <= n_fit and 1 <= n_eval and n_fit + n_eval <= total):
            raise ValueError(
                f"--n-fit ({n_fit}) and --n-eval ({n_eval}) must be at least 2 and 1 and "
                f"together at most the {total} samples of --data."
            )
        check_data(data, n_fit, n_fit + n_eval)
        check_model_runs(model, args.layers, data)
        labels = None
        if args.labels is not None:
            labels = load_labels(args.labels, total, n_eval)
            labels = labels[n_fit:n_fit + n_eval] if len(labels) == total else labels
        output = demo._output_folder(args.output, args.overwrite)
    except (ValueError, TypeError, FileExistsError, NotADirectoryError) as exc:
        parser.error(str(exc))
    split = (slice(0, n_fit), slice(n_fit, n_fit + n_eval))
    X_fit, X_eval = (_adapters.take(data, s) if isinstance(data, dict) else data[s]
                     for s in split)
    return model, X_fit, X_eval, labels, output


def main(argv=None):
    """``python -m sklearn_lib --model module:factory --layers ... --data file.npy``."""
    from . import _main as demo

    parser = _parser()
    args = parser.parse_args(argv)
    model, X_fit, X_eval, y, target = _checked(parser, args)
    model.eval()  # a model built for this run: dropout off, BatchNorm's running statistics
    start = time.perf_counter()
    if y is None:
        with torch.no_grad():
            inputs = _model_inputs(X_eval, model)
            y = _output(_adapters.call(model, inputs)).argmax(1).cpu().numpy()
    X_eval = _model_inputs(X_eval, model)
    results = _compare(model, args.layers, X_fit, X_eval, y, sequence=args.sequence,
                       tolerance=args.tolerance, resolution=args.resolution,
                       verbose=args.verbose)
    tmp = Path(make_temp_dir(str(target), "sklearn_lib demo"))
    try:
        (tmp / demo._MARKER).write_text(json.dumps(demo._MARKER_CONTENT))
        (tmp / "comparison.json").write_text(json.dumps(results, indent=2))
        check_target(str(target), args.overwrite, demo._is_demo_output, demo._WHAT)
        replace_dir(str(tmp), str(target))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.verbose:
        print(demo.format_table(results, args.tolerance, layers=args.layers))
        print(f"\nwrote {target}{os.sep} in {time.perf_counter() - start:.1f} s")
    return results


def _model_inputs(data, model):
    """Evaluation inputs as tensors on the model's device (floating ones in its dtype)."""
    from ..models._model import _input_tensor

    param = next(model.parameters())
    return _input_tensor(data, param.device, param.dtype)
