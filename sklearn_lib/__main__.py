"""``python -m sklearn_lib``: the end-to-end demo (see :mod:`sklearn_lib.demo`)."""

from .demo import main

if __name__ == "__main__":
    main()
