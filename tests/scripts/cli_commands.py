"""Several ``epas_lightning`` commands one after the other in one fresh interpreter (its imports paid once), each
command's stderr in a file of its own (file descriptor 2 itself, so Lightning's log lines and native writes too).

    python tests/scripts/cli_commands.py ERR_DIR ARGS_JSON
    (run by ``helpers.run_cli_commands``)

``ARGS_JSON`` is a list of argument lists; command ``i`` writes its stderr to ``ERR_DIR/<i>.err`` and its exit status
as line ``i`` of stdout.
"""

import json
import os
import sys
from pathlib import Path

from epas_lightning.cli import main

if __name__ == "__main__":
    err_dir, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
    for i, args in enumerate(commands):
        sys.stderr.flush()
        with (err_dir / f"{i}.err").open("w") as err:
            os.dup2(err.fileno(), 2)
            status = main(args)
            sys.stderr.flush()
        print(status, flush=True)
