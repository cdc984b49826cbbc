"""``python -m qvec_jax.cli``: the same as the ``qvec`` command."""

import sys

from qvec_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
