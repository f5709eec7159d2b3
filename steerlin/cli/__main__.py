"""`python -m steerlin.cli ...`: the same as the `steerlin` console script."""

import sys

from . import main

sys.exit(main())
