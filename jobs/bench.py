"""`ray job submit --working-dir . -- python jobs/bench.py --config jobs/configs/X.yaml [key=value ...]`

Runs the bench stage alone (same as `distray bench --config ...`) on the job's Ray cluster.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("bench"))
