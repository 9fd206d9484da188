"""`python -m anygpt_engine ...` (and `torchrun ... -m anygpt_engine ...`): the command line."""

import sys

from anygpt_engine.cli import main

sys.exit(main())
