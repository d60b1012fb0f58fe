"""Small helpers shared by the benchmarks: timing, percentiles, tables, a JSON record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(os.environ.get("VPM_BENCH_OUT", "data/bench"))
# The machine's PostgreSQL server, for the benchmarks that use one (each in a database of its own).
POSTGRES = os.environ.get("VPM_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def closed_loop(
    call: Callable[[Any], Any], items: Sequence[Any], concurrency: int, seconds: float, pool: Any
) -> list[float]:
    """Seconds of each `call(item)` made by `concurrency` workers on `pool` (an executor)
    for `seconds`, each waiting for its call before the next: worker n sends items n,
    n + concurrency, ... (cycling)."""
    stop_at = time.monotonic() + seconds

    def worker(number: int) -> list[float]:
        mine = []
        i = number
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            call(items[i % len(items)])
            mine.append(time.perf_counter() - started)
            i += concurrency
        return mine

    return [s for part in pool.map(worker, range(concurrency)) for s in part]


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; numbers are shown with sensible precision."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [title, "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(
            c.rjust(w) if isinstance(v, int | float) else c.ljust(w)
            for c, w, v in zip(row, widths, raw, strict=True)
        )
        for row, raw in zip(cells, rows, strict=True)
    ]
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def record(name: str, figures: dict[str, Any]) -> Path:
    """Write the figures as JSON under data/bench/ (for BENCHMARKS.md and comparisons)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    figures = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    path.write_text(json.dumps(figures, indent=2, default=float))
    return path


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14, stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def verdict(met: bool) -> str:
    return "met" if met else "NOT MET"


# -- a catalog on disk -------------------------------------------------------------------------

STYLES_HEADER = (
    "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,"
    "productDisplayName"
)
_BASES = 16  # distinct pictures per size; each file stamps its own mark on one
_bases: dict[tuple[int, int, int], Any] = {}  # per process: the pictures, made once


def write_catalog(
    folder: Path,
    count: int,
    sizes: Sequence[tuple[int, int]],
    processes: int = 1,
    quality: int = 90,
) -> Path:
    """styles.csv + images/<id>.jpg for `count` products, sizes cycled, every file's pixels its own.

    Each image is one of a few textured pictures with a mark drawn from its index, so
    writing 42,700 of them costs a JPEG encode each (1.4 ms at 640x480, about 70 KB
    at quality 90); `processes` > 1 spreads that over processes.
    """
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = [STYLES_HEADER]
    lines += [
        f"{index},Men,Apparel,Topwear,Tshirts,Blue,Fall,2012,Casual,Product {index}"
        for index in range(count)
    ]
    (folder / "styles.csv").write_text("\n".join(lines) + "\n")
    step = max(1, -(-count // max(1, processes * 4)))
    jobs = [
        (str(folder / "images"), start, min(start + step, count), tuple(sizes), quality)
        for start in range(0, count, step)
    ]
    if processes <= 1:
        for job in jobs:
            _write_images(*job)
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.starmap(_write_images, jobs)
    return folder


def _write_images(
    folder: str, start: int, stop: int, sizes: tuple[tuple[int, int], ...], quality: int
) -> None:
    import io

    import numpy as np
    from PIL import Image

    from tests import images

    bases = _bases
    for index in range(start, stop):
        width, height = sizes[index % len(sizes)]
        key = (width, height, index % _BASES)
        if key not in bases:
            bases[key] = np.asarray(images.picture(width, height, seed=key[2]))
        pixels = bases[key].copy()
        side = max(2, min(width, height) // 8)
        x = (index * 7919) % max(1, width - side)
        y = (index * 104729) % max(1, height - side)
        pixels[y : y + side, x : x + side] = (index % 251, (index // 251) % 251, index * 37 % 251)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        Path(folder, f"{index}.jpg").write_bytes(buffer.getvalue())
