"""The one factory: model, preprocessing and tokenizer from one validated config.

Every runtime (PyTorch, ONNX Runtime) starts from what `load_model` returns,
so their vectors cannot drift apart. Besides open_clip's own architectures it
registers `VPM-Tiny`, a two-layer CLIP of the same shape used by fast tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
RANDOM = "none"
HUB_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailable(RuntimeError):
    """The requested weights are neither cached nor downloadable: one line says what to do."""


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build: an open_clip architecture and its weights."""

    name: str = "ViT-B-32"
    # An open_clip pretrained tag, a local checkpoint path, or "none" for seeded random weights.
    pretrained: str = "laion2b_s34b_b79k"
    seed: int = 0
    cache_dir: str | None = None

    @property
    def random_weights(self) -> bool:
        return self.pretrained.lower() == RANDOM


@dataclass
class LoadedModel:
    """An fp32 open_clip model on the CPU, in eval mode, with its preprocess and tokenizer."""

    config: ModelConfig
    model: Any  # open_clip.CLIP
    preprocess: Callable[[Any], Any]  # PIL image -> float32 tensor (3, S, S)
    tokenizer: Tokenizer
    model_id: str
    dim: int
    image_size: int
    context_length: int
    pretrained_label: str

    @property
    def random_weights(self) -> bool:
        return self.config.random_weights


# Words open_clip's tokenizer remembers (it keeps every distinct word it ever saw): past this,
# the memory of a long-running encoder would grow with every new query.
TOKEN_CACHE_ENTRIES = 50_000


class Tokenizer:
    """open_clip's tokenizer, with the same tokens, bounded in time and memory for any text.

    For open_clip's BPE tokenizer (CLIP's), only the words that can reach the context are
    encoded: every word is at least one token, so the first `context_length` words hold
    all that is kept, and a long text costs no more than a short one. Its word cache
    is cleared when full. Other tokenizers are called as they are.
    """

    def __init__(
        self, inner: Callable[[list[str]], Any], cache_entries: int = TOKEN_CACHE_ENTRIES
    ) -> None:
        self._inner = inner
        self.context_length = int(getattr(inner, "context_length", None) or 77)
        self._bpe = (
            type(inner).__name__ == "SimpleTokenizer" and getattr(inner, "reduction_fn", 0) is None
        )
        if self._bpe:
            inner.cache = _BoundedCache(inner.cache, cache_entries)

    def __call__(self, texts: Sequence[str]) -> Any:
        """texts -> int64 tensor (N, context_length), as open_clip's tokenizer gives it."""
        if not self._bpe:
            return self._inner(list(texts))
        import torch

        result = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self._tokens(text)
            result[row, : len(tokens)] = torch.tensor(tokens)
        return result

    def is_empty(self, row: Any) -> bool:
        """A row of nothing but the start and end tokens: a text that cleaned to nothing
        (control characters, markup such as &nbsp;)."""
        return self._bpe and int(row[1]) == self._inner.eot_token_id

    def _tokens(self, text: str) -> list[int]:
        """SimpleTokenizer.encode's steps, over the first context_length words only; then
        its truncation (the end token replaces the last one kept)."""
        inner = self._inner
        tokens = [inner.sot_token_id]
        words = inner.pat.finditer(inner.clean_fn(text))  # the `regex` module's pattern
        for word in itertools.islice(words, self.context_length):
            symbols = "".join(inner.byte_encoder[b] for b in word.group().encode("utf-8"))
            tokens.extend(inner.encoder[piece] for piece in inner.bpe(symbols).split(" "))
        return tokens[: self.context_length - 1] + [inner.eot_token_id]


class _BoundedCache(dict):
    """A dict that starts over from its first entries (the special tokens) when full."""

    def __init__(self, first: dict, limit: int) -> None:
        super().__init__(first)
        self._first = dict(first)
        self._limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        if len(self) >= self._limit:
            self.clear()
            self.update(self._first)
        super().__setitem__(key, value)


def load_model(config: ModelConfig) -> LoadedModel:
    """Build the model `config` names; WeightsUnavailable or ValueError say what is wrong."""
    open_clip = _import_open_clip()
    if config.name not in open_clip.list_models():
        raise ValueError(
            f"unknown model {config.name!r}; open_clip knows e.g. ViT-B-32, ViT-B-16, ViT-L-14, "
            f"and this project adds VPM-Tiny"
        )
    pretrained, model_id, label = _resolve_weights(open_clip, config)
    try:
        with _quiet_root_logger(), _seeded(config.seed):
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.name, pretrained=pretrained, cache_dir=config.cache_dir
            )
    except RuntimeError as error:
        if pretrained is None or Path(pretrained).is_file():
            raise
        raise WeightsUnavailable(weights_error_line(config, error)) from None
    model.eval()
    with _quiet_root_logger():
        tokenizer = open_clip.get_tokenizer(config.name)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else int(image_size)
    if config.random_weights:
        logger.warning(
            "!!! RANDOM WEIGHTS: %s built with seeded random weights (--pretrained none, seed %d). "
            "Vectors are deterministic but carry no meaning; use real weights for real search. !!!",
            config.name,
            config.seed,
        )
    return LoadedModel(
        config=config,
        model=model,
        preprocess=preprocess,
        tokenizer=Tokenizer(tokenizer),
        model_id=model_id,
        dim=int(model.text_projection.shape[1])
        if getattr(model, "text_projection", None) is not None
        else int(model.visual.output_dim),
        image_size=image_size,
        context_length=int(getattr(tokenizer, "context_length", 77)),
        pretrained_label=label,
    )


def _import_open_clip() -> Any:
    import open_clip

    if str(CONFIG_DIR) not in {str(p) for p in open_clip.factory._MODEL_CONFIG_PATHS}:
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def _resolve_weights(open_clip: Any, config: ModelConfig) -> tuple[str | None, str, str]:
    """(what to pass open_clip as `pretrained`, the model id, a label for logs and GetModelInfo)."""
    if config.random_weights:
        return None, f"{config.name}/random-seed{config.seed}", RANDOM
    path = Path(config.pretrained).expanduser()
    if path.is_file():
        return str(path), f"{config.name}/file-{_file_digest(path)}", path.name
    if os.sep in config.pretrained or config.pretrained.endswith((".pt", ".bin", ".safetensors")):
        raise WeightsUnavailable(f"--pretrained {config.pretrained}: no such checkpoint file")
    tags = open_clip.list_pretrained_tags_by_model(config.name)
    if config.pretrained not in tags:
        known = ", ".join(tags) if tags else "none for this architecture"
        raise ValueError(
            f"--pretrained {config.pretrained!r} is not a known tag for {config.name} "
            f"(known: {known}); pass a checkpoint path or 'none'"
        )
    if not hub_reachable():
        # Offline: let open_clip use its cache only, instead of retrying for a minute.
        _force_hub_offline()
    return config.pretrained, f"{config.name}/{config.pretrained}", config.pretrained


def weights_error_line(config: ModelConfig, error: BaseException) -> str:
    """The one line printed when weights cannot be had (no network and not cached)."""
    return (
        f"cannot load weights {config.pretrained!r} for {config.name}: not cached and no network "
        f"to download them ({type(error).__name__}). Use --pretrained PATH with a local "
        "checkpoint file, or --pretrained none for the real architecture with random weights."
    )


def hub_reachable() -> bool:
    """Whether the model hub answers a TCP connection within a few seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def weights_cached(name: str, tag: str) -> bool:
    """Whether open_clip's weights for `tag` are already in the local Hugging Face cache."""
    try:
        open_clip = _import_open_clip()
        config = open_clip.get_pretrained_cfg(name, tag)
        from huggingface_hub import try_to_load_from_cache
    except Exception:  # noqa: BLE001 - unknown tag or no hub client: not cached
        return False
    repo = config.get("hf_hub", "").strip("/")
    if not repo:
        return False
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return True
    return False


def _force_hub_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Make random initialisation reproducible without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """open_clip logs through the root logger; its lines on weights are replaced by ours."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(previous)
