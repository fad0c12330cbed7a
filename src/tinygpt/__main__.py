"""`python -m tinygpt` is the `tinygpt` command (and what `torchrun -m tinygpt` starts)."""

import sys

from tinygpt.cli import main

sys.exit(main())
