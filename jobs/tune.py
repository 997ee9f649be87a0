"""`ray job submit --working-dir . -- python jobs/tune.py -c configs/digits_mlp.yaml [--set ...] [--resume]`

Runs `rayscale tune` inside a Ray job, on the cluster the job runs in (RAY_ADDRESS is set by the job).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayscale.cli import main  # noqa: E402

if __name__ == "__main__":
    # --debug (the traceback of bad input) is the command line's own flag, before the command: taken from anywhere.
    debug = ["--debug"] if "--debug" in sys.argv[1:] else []
    sys.exit(main([*debug, "tune", *(arg for arg in sys.argv[1:] if arg != "--debug")]))
