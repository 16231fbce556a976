"""``python -m shoal.cli``: the same as the ``shoal`` command."""

from .main import main

main()
