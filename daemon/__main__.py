import sys

from weightd.daemon.cli import main

sys.exit(main())
