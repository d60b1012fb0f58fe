"""Search-time parameters of approximate FAISS indexes: efSearch (HNSW) and nprobe (IVF).

They change how deep a search looks, never what the index holds, so they are
set on a built or loaded index (and on its GPU replica) without a rebuild, and
can be passed per call (a measurement trying several values beside live searches).
"""

from __future__ import annotations

import faiss
import numpy as np

# Defaults of the service; --index-params overrides them, and --target-recall after it.
DEFAULT_PARAMS = {"efSearch": "efSearch=128", "nprobe": "nprobe=32"}
# The efSearch values a measurement tries, in order (each past the last by ~1.5x):
# recall grows with efSearch and saturates, latency grows about linearly with it.
EF_SEARCH_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


# What --index-params may set that is built into the index rather than read per search: an
# HNSW graph keeps the links each vector got when it was added with its efConstruction.
BUILD_PARAMS = ("efConstruction",)


def build_params_of(index: faiss.Index) -> dict[str, int]:
    """The build-time parameters `index` was made with (empty: it has none)."""
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        return {"efConstruction": int(hnsw.hnsw.efConstruction)}
    return {}


def asked_build_params(params: str) -> dict[str, int]:
    """The build-time parameters `params` names ("name=value,..." as FAISS takes them)."""
    asked = {}
    for part in params.split(","):
        name, _, value = part.partition("=")
        if name.strip() in BUILD_PARAMS:
            asked[name.strip()] = int(float(value))
    return asked


def parameter_of(index: faiss.Index) -> str | None:
    """The search parameter that trades recall for speed in `index` (None: it has none)."""
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return "efSearch"
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    return None


def apply_params(index: faiss.Index, params: str) -> None:
    """The service's defaults for `index`'s parameter, then `params` (FAISS's own syntax)."""
    space = faiss.ParameterSpace()
    default = DEFAULT_PARAMS.get(parameter_of(index) or "")
    for text in (default, params):
        if text:
            space.set_index_parameters(index, text)


def value_of(index: faiss.Index) -> int | None:
    """The value of `index`'s search parameter in force (None: it has none)."""
    parameter = parameter_of(index)
    if parameter == "efSearch":
        return int(faiss.downcast_index(index).hnsw.efSearch)
    if parameter == "nprobe":
        return int(faiss.try_extract_index_ivf(index).nprobe)
    return None


def set_value(index: faiss.Index, value: int) -> None:
    """Put `value` in force as `index`'s search parameter."""
    parameter = parameter_of(index)
    if parameter == "efSearch":
        faiss.downcast_index(index).hnsw.efSearch = value
    elif parameter == "nprobe":
        faiss.try_extract_index_ivf(index).nprobe = value
    else:
        raise ValueError(f"{type(index).__name__} has no search parameter to set")


def ladder(index: faiss.Index) -> tuple[int, ...]:
    """The values of `index`'s parameter a measurement tries, smallest first.

    nprobe: powers of two up to the number of lists, where IVF-Flat is exact.
    """
    parameter = parameter_of(index)
    if parameter == "efSearch":
        return EF_SEARCH_LADDER
    if parameter == "nprobe":
        nlist = int(faiss.try_extract_index_ivf(index).nlist)
        values = [1 << power for power in range(nlist.bit_length()) if 1 << power < nlist]
        return (*values, nlist)
    return ()


def search_parameters(
    index: faiss.Index, bits: np.ndarray | None, value: int | None = None
) -> faiss.SearchParameters | None:
    """Per-call parameters: a selector over the rows set in `bits` (None: every row) and
    `value` for the search parameter (None: the one in force)."""
    if bits is None and value is None:
        return None
    selector = None if bits is None else faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    parameter = parameter_of(index)
    value = value_of(index) if value is None else value
    if parameter == "efSearch":
        params = faiss.SearchParametersHNSW(efSearch=value)
    elif parameter == "nprobe":
        params = faiss.SearchParametersIVF(nprobe=value)
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    params.keep_alive = (selector, bits)  # SWIG holds raw pointers to both
    return params
