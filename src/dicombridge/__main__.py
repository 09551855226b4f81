"""``python -m dicombridge``: the same as the ``dicombridge`` command."""

from dicombridge.cli import main

main()
