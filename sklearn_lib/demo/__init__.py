"""The end-to-end demo (``python -m sklearn_lib``): LIB against PCA on the shipped networks.

The outermost room: may import every other subpackage; nothing imports it.
"""

from ._cli import main
from ._main import run

__all__ = ["main", "run"]
