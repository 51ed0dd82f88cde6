"""``python -m engram``: the ``engram`` command (e.g. under ``torchrun ... -m engram train``)."""

from engram.cli.main import main

raise SystemExit(main())
