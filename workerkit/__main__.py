"""``python -m workerkit``: the same command as the ``workerkit`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
