"""`ray job submit --working-dir . -- python jobs/train.py -c configs/digits_mlp.yaml [--set KEY=VALUE ...]`

Runs `rayscale train` inside a Ray job: RAY_ADDRESS is set by the job, so it joins the cluster it runs in.
The submitted working directory comes first on sys.path, so the job runs exactly the code that was submitted.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayscale.cli import main  # noqa: E402

if __name__ == "__main__":
    # --debug (the traceback of bad input) is the command line's own flag, before the command: taken from anywhere.
    debug = ["--debug"] if "--debug" in sys.argv[1:] else []
    sys.exit(main([*debug, "train", *(arg for arg in sys.argv[1:] if arg != "--debug")]))
