"""``python -m tokenmix.bench.worker POINT_JSON``: measure one benchmark point, print its record as JSON."""

import json
import sys

from .runner import run_point

print(json.dumps(run_point(json.loads(sys.argv[1]))))
