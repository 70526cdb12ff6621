"""The torch.compile worker of ``ldae bench``: ``python -m ldae.jobs.bench --compile-worker REQUEST RESULT``."""

import sys

from ldae.jobs.bench.compile import compile_worker

if len(sys.argv) == 4 and sys.argv[1] == "--compile-worker":
    compile_worker(sys.argv[2], sys.argv[3])
else:
    sys.exit("usage: python -m ldae.jobs.bench --compile-worker REQUEST.json RESULT.json")
