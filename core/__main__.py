"""``python -m dqr``: the same as the ``dqr`` command."""

from dqr.cli import main

main()
