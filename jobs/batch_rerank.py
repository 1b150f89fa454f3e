"""Entry point for `ray job submit`: the same job as `prism-ray batch`, flags and all.

    ray job submit --working-dir . -- python jobs/batch_rerank.py --config jobs/example.yaml

Under `ray job submit` the driver finds the cluster through RAY_ADDRESS, and the working directory
travels to every worker, so the actors import this checkout's `prism_ray`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
