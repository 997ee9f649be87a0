"""The driver's memory against the dataset's size: what `rayscale train` does on the driver before any worker
starts (every check, the lane layout's row counts, the workers' payload), for 10k, 1M and 10M synthetic rows,
each in a fresh process. The driver builds no dataset and holds no row: its memory should not grow with the rows.

    .venv/bin/python -m benchmarks.driver_memory
"""

from __future__ import annotations

import json
import subprocess
import sys

ROWS = (10_000, 1_000_000, 10_000_000)

MEASURE = """
import json, resource, sys, tracemalloc
from rayscale import config
from rayscale.driver.prepare import prepare, worker_payload
tracemalloc.start()
cfg = config.load(overrides=["data.source=synthetic", f"data.synthetic.rows={sys.argv[1]}", "run.output_dir=/tmp"])
payload = worker_payload(prepare(cfg))
print(json.dumps({"rows": int(sys.argv[1]), "chunks": len(payload.train_chunk_rows),
                  "traced_peak_mib": round(tracemalloc.get_traced_memory()[1] / 2**20, 1),
                  "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def main() -> None:
    results = [json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(rows)], capture_output=True, text=True,
                                         check=True).stdout) for rows in ROWS]
    growth = results[-1]["max_rss_mib"] / results[0]["max_rss_mib"] - 1
    print(json.dumps({"runs": results, "targets": [{"name": "driver max RSS growth, 10k to 10M rows",
                                                    "value": round(growth, 3), "target": "< 0.1",
                                                    "pass": growth < 0.1}]}, indent=1))


if __name__ == "__main__":
    main()
