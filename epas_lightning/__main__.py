import sys

from epas_lightning.cli import main

sys.exit(main())
