import sys

from diffrl.cli import main

sys.exit(main())
