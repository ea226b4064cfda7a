"""Print how long reloading the course model from labkit's cache takes (it was a timed test; the target is < 2 s).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reload_time.py [repeats]

The first load may convert the offline GGUF once; the reloads after it read the cached safetensors.
"""

import statistics
import sys
import time

from labkit.models import load_model

repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
started = time.perf_counter()
load_model()
print(f"first load: {time.perf_counter() - started:.2f} s")
times = []
for _ in range(repeats):
    started = time.perf_counter()
    load_model()
    times.append(time.perf_counter() - started)
print(f"cached reload: median {statistics.median(times):.2f} s, best {min(times):.2f} s over {repeats} "
      f"({'under' if statistics.median(times) < 2.0 else 'OVER'} the 2 s target)")
