import sys

from pluggably.server import main

sys.exit(main())
