"""`python -m bench [name ...]`: run the benchmarks (all by default) and print their tables."""

from __future__ import annotations

import importlib
import logging
import sys
import time

# name -> module with a run() that prints its tables and returns its figures
BENCHES = {
    "encoder": "bench.encoder.encoder_bench",
    "search": "bench.search.search_bench",
    "query-cache": "bench.search.query_cache_bench",
    "shared-catalog": "bench.search.shared_catalog_bench",
    "indexer": "bench.indexer_bench",
    "web": "bench.web_bench",
    "recall": "bench.search.recall_bench",
    "jpeg-header": "bench.encoder.jpeg_header_bench",
    "query": "bench.search.query_bench",
}


def main(argv: list[str]) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    names = argv or list(BENCHES)
    unknown = [name for name in names if name not in BENCHES]
    if unknown:
        print(
            f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHES)}",
            file=sys.stderr,
        )
        return 2
    for name in names:
        started = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(BENCHES[name]).run()
        print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
