import sys

from pdtui.cli import main

sys.exit(main())
