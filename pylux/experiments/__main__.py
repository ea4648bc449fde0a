import sys

from .cli import main

sys.exit(main(["experiments", *sys.argv[1:]]))
