"""`ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/X.yaml [key=value ...]`

Runs the serve stage alone (same as `distray serve --config ...`) on the job's Ray cluster.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("serve"))
