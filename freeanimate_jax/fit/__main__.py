import sys

from freeanimate_jax.cli.fit import main

sys.exit(main(sys.argv[1:]))
