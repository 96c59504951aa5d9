"""``python -m cellexplain``: the ``cellexplain`` command."""

from cellexplain.client.cli import main

raise SystemExit(main())
