"""``python -m sfumato``: the command line (see :mod:`sfumato.cli`)."""

import sys

from sfumato.cli import main

sys.exit(main())
