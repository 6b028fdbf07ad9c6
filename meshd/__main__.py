import sys

from .cli.meshd import main

sys.exit(main())
