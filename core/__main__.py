"""`python -m vlbridge` is the `vlbridge` command."""

from vlbridge.cli.main import main

raise SystemExit(main())
