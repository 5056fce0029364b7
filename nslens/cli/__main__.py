"""``python -m nslens.cli``."""

from . import main

main()
