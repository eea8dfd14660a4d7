"""`python -m launch ...` from the repo root: the same CLI for `ray job submit --working-dir .`."""
from .cli import main

raise SystemExit(main())
