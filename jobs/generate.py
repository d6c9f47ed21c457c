"""`ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/X.yaml [key=value ...]`

Runs the generate stage alone (same as `distray generate --config ...`) on the job's Ray cluster.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("generate"))
