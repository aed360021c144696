"""`python -m vmafs` runs the command line."""

import sys

from vmafs.cli import main

sys.exit(main())
