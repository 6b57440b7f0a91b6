"""``python -m sklearn_lib``: the command line of the demo, and of ``--model`` (your model)."""

import argparse
import sys

from ._main import NETWORKS, _output_folder, _parse, run
from ._user_model import main as main_model


def main(argv=None):
    """Command-line entry point (``python -m sklearn_lib``; with ``--model``, your model)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--model" or a.startswith("--model=") for a in args):
        return main_model(args)
    parser = argparse.ArgumentParser(
        prog="python -m sklearn_lib",
        description="Local interaction basis vs PCA on the shipped modular-addition "
                    "transformer (or MLP, --network mlp).",
    )
    parser.add_argument("--network", choices=NETWORKS, default="transformer",
                        help="the shipped network: the 1-layer transformer (default) or the "
                             "MLP (adds Gini, modularity and the degeneracy table)")
    parser.add_argument("--output", default="sklearn_lib_demo",
                        help="output folder; if an earlier run wrote it, <output>-2 (-3, ...) "
                             "is written instead, unless --overwrite")
    parser.add_argument("--n-fit", type=_parse("n_fit", int), default=None,
                        help="training pairs to fit (1 to 3831; default all 3831 for the "
                             "transformer, 2000 for the MLP)")
    parser.add_argument("--n-eval", type=_parse("n_eval", int), default=1000,
                        help="held-out pairs to score (1 to 8938, default 1000)")
    parser.add_argument("--tolerance", type=_parse("tolerance", float), default=0.001,
                        help="allowed accuracy drop, in [0, 1) (default 0.001)")
    parser.add_argument("--resolution", type=_parse("resolution", float), default=1.0,
                        help="Leiden resolution of the MLP's modules, positive (default 1.0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output folder of an earlier run (never another folder)")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    parser.add_argument("--quiet", dest="verbose", action="store_false")
    args = parser.parse_args(argv)
    try:
        _output_folder(args.output, args.overwrite)
    except (FileExistsError, NotADirectoryError) as exc:
        parser.error(str(exc))
    run(args.output, network=args.network, n_fit=args.n_fit, n_eval=args.n_eval, tolerance=args.tolerance,
        resolution=args.resolution, overwrite=args.overwrite, plots=args.plots,
        verbose=args.verbose)
