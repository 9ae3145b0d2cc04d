"""``python -m benchmarks.peers``: create or check the peers' environments."""

import sys

from . import main

sys.exit(main())
