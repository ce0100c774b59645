"""``python -m compilepass.cli``: the same as the ``compilepass`` command."""

import sys

from compilepass.cli.app import main

sys.exit(main())
