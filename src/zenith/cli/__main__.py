"""``python -m zenith.cli``: the same as the ``zenith`` command."""

from zenith.cli.main import main

main()
