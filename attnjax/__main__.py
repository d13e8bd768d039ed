import sys

from attnjax.cli import main

sys.exit(main())
