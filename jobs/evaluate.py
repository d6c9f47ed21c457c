"""`ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/X.yaml [key=value ...]`

Runs the evaluate stage alone (same as `distray evaluate --config ...`) on the job's Ray cluster.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("evaluate"))
