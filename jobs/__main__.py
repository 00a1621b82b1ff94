"""`python -m vidray.jobs ...`: the `vidray` command, for a node or job whose PATH lacks the console
script. (Here, not in the library package: library code does not import jobs.)"""

import sys

from vidray.jobs.cli import main

sys.exit(main())
