"""Train the embedded tiny LLaVA, v2 recipe (thin wrapper around ``tokensieve.embedded.train.main``).

Example: ``python scripts/train_tiny.py --out-dir runs/embedded-v2`` (rerun it to resume; ``--ship`` installs
the final model as the package's shipped weights; ``--help`` lists every option).
"""

import os
import sys
from pathlib import Path

# Passive OpenMP waiting keeps 2 threads from spinning against other processes on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokensieve.embedded.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
