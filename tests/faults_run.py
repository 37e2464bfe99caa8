"""``python tests/faults_run.py fit ...``: the CLI (experiments/run.py) with tests/faults.py imported first."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faults  # noqa: E402,F401  (registers the test reward)
from lightning_latent.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
