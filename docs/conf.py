"""Sphinx configuration for the sklearn_lib documentation."""

import os

import sklearn_lib

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
# Cross-references to the outside world are resolved from the inventories below
# only when the build has network access; offline builds must not warn about them.
numpydoc_xref_param_type = False
nitpicky = False

intersphinx_mapping = {}

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
}
