"""``python -m fastdensity``: the same as the ``fastdensity`` console script."""
import sys

from .cli import main

sys.exit(main())
