"""`python -m vidray ...`: the `vidray` command, for a node or job whose PATH lacks the console script."""

import sys

from vidray.jobs.cli import main

sys.exit(main())
