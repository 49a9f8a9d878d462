import sys

from freeanimate_jax.fit.cli import main

sys.exit(main(sys.argv[1:]))
