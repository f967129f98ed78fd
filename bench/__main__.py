"""``python -m bench``: the benchmark sweep (see :mod:`bench.run`)."""
import sys

from .run import main

sys.exit(main())
