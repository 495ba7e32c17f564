import sys

from frugalm.cli import main

sys.exit(main())
