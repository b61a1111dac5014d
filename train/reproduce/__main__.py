"""``python -m train.reproduce``: see :mod:`train.reproduce`."""
from . import main

main()
