"""Run the kernattn command line with ``python -m kernattn``."""

import sys

from kernattn.cli import main

sys.exit(main())
