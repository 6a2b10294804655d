"""`python -m ease.results DIR [DIR...]`: see ease.results.cli."""

import sys

from ease.results.cli import main

sys.exit(main())
