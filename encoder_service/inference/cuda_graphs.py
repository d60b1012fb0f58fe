"""The image tower replayed as CUDA graphs, one per batch-size bucket.

A ViT-B-32 forward is a few hundred small kernels; at small batches their
launch cost, not the arithmetic, sets the latency. A graph launches them all
at once. Each bucket has its own graph over a shared input buffer and memory
pool; a batch runs in the smallest bucket that holds it (rows past the batch
are stale, and harmless: images do not interact in a ViT), and larger batches
run eagerly.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

WARM_UP_RUNS = 3  # eager runs on a side stream before capture, as the CUDA graph docs ask
SMALL_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes to warm up (and capture): powers of two to 64, then eighths of max_batch.

    A batch pads to the next bucket under graphs; fine steps above 64 bound
    that waste, and a handful of graphs bounds the capture time and memory.
    """
    step = max(64, max_batch // 8)
    sizes = {size for size in SMALL_BUCKETS if size < max_batch}
    sizes.update(range(step, max_batch, step))
    sizes.add(max_batch)
    return sorted(sizes)


class GraphedTower:
    """Calls `tower` through captured graphs; None for batches larger than every bucket."""

    def __init__(self, graphs: dict[int, Any], outputs: dict[int, Any], static_input: Any) -> None:
        self._graphs = graphs
        self._outputs = outputs
        self._input = static_input
        self.batch_sizes = sorted(graphs)

    @classmethod
    def capture(
        cls,
        tower: Callable[[Any], Any],
        batch_sizes: list[int],
        image_size: int,
        dtype: Any,
        device: str,
    ) -> GraphedTower | None:
        """Capture one graph per batch size; None (eager from then on) if capture fails."""
        import torch

        sizes = sorted(set(batch_sizes), reverse=True)  # largest first: the pool fits the rest
        try:
            with torch.no_grad():
                static_input = torch.zeros(
                    (sizes[0], 3, image_size, image_size), dtype=dtype, device=device
                )
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for size in sizes:
                        for _ in range(WARM_UP_RUNS):
                            tower(static_input[:size])
                torch.cuda.current_stream().wait_stream(side)
                pool = torch.cuda.graph_pool_handle()
                graphs, outputs = {}, {}
                for size in sizes:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        outputs[size] = tower(static_input[:size])
                    graphs[size] = graph
                torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - graphs are an optimisation; eager still works
            logger.warning("CUDA graph capture failed; the image tower runs eagerly", exc_info=True)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
            return None
        logger.info("CUDA graphs captured for image batches of %s", sorted(graphs))
        return cls(graphs, outputs, static_input)

    def __call__(self, pixels: Any) -> Any | None:
        count = pixels.shape[0]
        at = bisect.bisect_left(self.batch_sizes, count)
        if at == len(self.batch_sizes):
            return None
        size = self.batch_sizes[at]
        self._input[:count].copy_(pixels)
        self._graphs[size].replay()
        return self._outputs[size][:count]
