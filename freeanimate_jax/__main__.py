"""`python -m freeanimate_jax ...` is the `freeanimate` command."""

from freeanimate_jax.cli import main

raise SystemExit(main())
