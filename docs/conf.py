"""Sphinx configuration for the sklearn_lib documentation."""

import os
import sys
from pathlib import Path

import sklearn_lib

sys.path.insert(0, str(Path(__file__).parent))
from inventories import cached_inventories  # noqa: E402

project = "sklearn_lib"
author = "The sklearn_lib developers"
copyright = "2026, The sklearn_lib developers"
release = sklearn_lib.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

autosummary_generate = True
# The set_*_request methods scikit-learn generates for metadata routing carry
# docstrings with references into scikit-learn's own documentation.
autodoc_default_options = {
    "members": True,
    "inherited-members": False,
    "exclude-members": ",".join(
        f"set_{method}_request"
        for method in ("fit", "partial_fit", "score", "transform", "inverse_transform",
                       "fit_transform", "predict")
    ),
}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# Cross-references to the outside world resolve only where an inventory below is
# available; the others render as plain text, without a warning.
numpydoc_xref_param_type = False
nitpicky = False

# Links to scikit-learn, PyTorch and NumPy. Sphinx would fetch the inventories itself
# and warn (an error with -W) or stall when offline; inventories.py downloads them
# with a time limit into a cache instead, and maps only those on disk, so an offline
# build links to what an earlier online build cached. SKLEARN_LIB_DOCS_OFFLINE=1 skips
# the network; SKLEARN_LIB_DOCS_INVENTORIES names the cache (default _build/inventories).
intersphinx_mapping = cached_inventories(
    {
        "python": "https://docs.python.org/3/",
        "numpy": "https://numpy.org/doc/stable/",
        "sklearn": "https://scikit-learn.org/stable/",
        "torch": "https://docs.pytorch.org/docs/stable/",
    },
    os.environ.get("SKLEARN_LIB_DOCS_INVENTORIES",
                   Path(__file__).parent / "_build" / "inventories"),
    offline=os.environ.get("SKLEARN_LIB_DOCS_OFFLINE") == "1",
)

# Maths are rendered by MathJax 3 (the tex-chtml component and its fonts, 1.6 MB, from
# the npm package mathjax@3.2.2, Apache-2.0) shipped in _static/mathjax: formulas show
# without a network connection, where Sphinx's default loads MathJax from a CDN.
html_static_path = ["_static"]
mathjax_path = "mathjax/tex-chtml.js"

exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py.md5",
                    "auto_examples/*.zip"]
templates_path = ["_templates"]

html_theme = "pydata_sphinx_theme"
html_title = "sklearn_lib"
html_theme_options = {"navigation_with_keys": False, "show_prev_next": False}

# The gallery runs every example at reduced size (SKLEARN_LIB_QUICK=1), so that
# the documentation build stays within CI's budget and shows real figures.
os.environ.setdefault("SKLEARN_LIB_QUICK", "1")
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/(plot_|quickstart)",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    # The timing page loads jQuery and DataTables from CDNs: not offline, and its
    # machine-dependent times say nothing about the examples.
    "write_computation_times": False,
}
