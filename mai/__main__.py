"""`python -m mai` is the `mai` command."""

import sys

from mai.cli import main

sys.exit(main())
