"""`ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/X.yaml [key=value ...]`

Runs the train stage alone (same as `distray train --config ...`) on the job's Ray cluster.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("train"))
