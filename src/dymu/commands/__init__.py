"""Sub-commands of the ``dymu`` CLI; one module each (see :mod:`dymu.cli`)."""
