"""``python -m napari_nephi.cli`` (used with torchrun): the same as the ``napari-nephi`` command."""

import sys

from . import main

sys.exit(main())
