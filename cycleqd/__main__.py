"""``python -m cycleqd ...``: the same as the ``cycleqd`` command (:func:`cycleqd.cli.main`)."""

from cycleqd.cli import main

raise SystemExit(main())
