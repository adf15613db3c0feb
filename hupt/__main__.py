import sys

from hupt.cli import main

sys.exit(main())
