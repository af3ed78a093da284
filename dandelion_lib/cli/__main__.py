"""``python -m dandelion_lib.cli``: the same as the ``dandelion`` command."""

import sys

from dandelion_lib.cli import main

sys.exit(main())
