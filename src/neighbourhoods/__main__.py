import sys

from neighbourhoods.cli import main

sys.exit(main())
