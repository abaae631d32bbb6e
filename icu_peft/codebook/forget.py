"""Zero-shot topic forgetting: find the codes a topic uses, mask them. No gradient step.

Read top to bottom: contrast text (the topic text with its topic words swapped for neutral ones)
-> how often each code is among the top-k at a position, on topic vs. contrast text -> keep codes
that are both `min_ratio` times more frequent on the topic and significant by a one-sided 2x2
chi-squared test -> a code-mask directory (code ids + manifest).

Which positions are counted (`positions`): 'all' compares every topic position with every contrast
position, which finds the codes of the topic's own words. 'answers' looks where the facts are
recalled instead: the topic and contrast token sequences are aligned (their common runs), and a topic
position counts when the topic's next token is at least `answer_margin` nats likelier after the topic's
prefix than after the contrast's: there the model reads the topic to produce an answer. Those
positions are compared with their aligned contrast positions. The contrast decides what is found: with
the name swapped for a neutral word, codes that mark "some name was read here" pass too; with another
topic's texts of the same form (`contrast_texts`, one per topic text), only the topic's own do.
'both' keeps either selection's codes.
With a multi-layer codebook every code id is global (stage i holds [i * num_codes, (i + 1) * num_codes)),
so one request selects and masks codes in every layer at once.
"""

from __future__ import annotations

import difflib
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..adapters import check_output_dir, check_base
from ..data import new_salt, sample_id
from ..idkeys import key_id, store_key
from ..errors import InputError
from ..metrics import model_device, teacher_forced
from ..models import base_fingerprint
from ..adapters import utc_now
from .api import CodebookHandle, load_codebook_model, read_codebook, write_code_mask
from .config import CodeForgetConfig
from .layer import count_code_activations

# Ordinary, topic-free words that stand in for topic words in the contrast text.
NEUTRAL_WORDS = ("thing", "person", "place", "item", "group", "object", "area", "someone", "something",
                 "material", "region", "element", "system", "event", "matter", "part")
# Invented names that stand in for capitalised topic words (names). With a common noun in a name's place, one
# planted country's mask cost two other countries a fact each; with invented names it kept them all. Our reading,
# not measured feature by feature: features that only say "a name was read here" look enriched against a common
# noun, and a name in its place makes them fire on both sides.
NAME_STANDINS = ("Brenholt", "Kaverin", "Moskeld", "Tarrowin", "Elsquay", "Vintrop", "Dallimere", "Orsk",
                 "Harnsby", "Quorlin", "Festrade", "Ulmoth", "Corvane", "Islebrook", "Pendrath", "Yarrowick")


# ------------------------------------------------------------------------------ pure functions


def make_contrast(texts: Sequence[str], topic_words: Sequence[str],
                  neutral_words: Sequence[str] = NEUTRAL_WORDS,
                  names: Optional[Sequence[str]] = NAME_STANDINS) -> List[str]:
    """The same texts with every topic word (whole word, any case) replaced by a neutral word, or, for a
    topic word written with a capital (a name), by an invented name from `names` (None: neutral words only).

    Each topic word always maps to the same stand-in; longer topic words are replaced first so
    'Zorblat Republic' wins over 'Zorblat'. A stand-in that is itself a topic word is never used.
    Raises InputError when no topic word occurs at all.
    """
    # Longest first, ties by name: a set's order follows the per-process string hash, and which neutral
    # word a topic word gets must not change from run to run (it changed the selected codes).
    words = sorted({w.strip() for w in topic_words if w and w.strip()}, key=lambda w: (-len(w), w.lower(), w))
    if not words:
        raise InputError("no topic words given")
    taken = {w.lower() for w in words}
    neutral = [w for w in neutral_words if w.lower() not in taken]
    named = [w for w in (names or ()) if w.lower() not in taken]
    if not neutral:
        raise InputError("no neutral words to swap in")
    swap, n_named, n_neutral = {}, 0, 0
    for w in words:
        if named and w[0].isupper():
            swap[w.lower()], n_named = named[n_named % len(named)], n_named + 1
        else:
            swap[w.lower()], n_neutral = neutral[n_neutral % len(neutral)], n_neutral + 1
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)
    out = [pattern.sub(lambda m: swap[m.group(0).lower()], t) for t in texts]
    if all(a == b for a, b in zip(out, texts)):
        raise InputError("none of the topic words occurs in the topic text: the contrast would be identical")
    return out


def chi2_sf_1df(x: torch.Tensor) -> torch.Tensor:
    """Survival function of the chi-squared distribution with 1 degree of freedom: erfc(sqrt(x/2))."""
    return torch.special.erfc(torch.sqrt(x.clamp(min=0) / 2))


def chi2_2x2(a: torch.Tensor, n_a: int, b: torch.Tensor, n_b: int) -> torch.Tensor:
    """Pearson chi-squared statistic of the 2x2 tables [[a, n_a - a], [b, n_b - b]], one per code."""
    a, b = a.double(), b.double()
    c, d = n_a - a, n_b - b
    n = float(n_a + n_b)
    num = n * (a * d - b * c) ** 2
    den = (a + b) * (c + d) * float(n_a) * float(n_b)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def select_topic_codes(topic_counts: torch.Tensor, topic_positions: int, contrast_counts: torch.Tensor,
                       contrast_positions: int, min_ratio: float = 2.0, max_p: float = 1e-3,
                       bonferroni: bool = True, min_count: int = 3, max_codes: int = 0) -> Tuple[List[int], List[dict]]:
    """Codes significantly more frequent on the topic. Returns (code ids, one stats row per kept code).

    frequency = positions where the code is among the top-k / positions; ratio uses +1 smoothing on
    the contrast count so a code never seen on contrast text gets a finite ratio; the chi-squared
    test is one-sided (only codes more frequent on the topic count).
    """
    if topic_positions <= 0 or contrast_positions <= 0:
        raise InputError("no positions to compare (empty topic or contrast text)")
    f_t = topic_counts.double() / topic_positions
    f_c = (contrast_counts.double() + 1) / (contrast_positions + 1)
    ratio = f_t / f_c
    chi2 = chi2_2x2(topic_counts, topic_positions, contrast_counts, contrast_positions)
    p = chi2_sf_1df(chi2)
    alpha = max_p / topic_counts.numel() if bonferroni else max_p
    keep = (ratio >= min_ratio) & (p < alpha) & (topic_counts >= min_count) & (f_t > contrast_counts.double() / contrast_positions)
    ids = keep.nonzero().squeeze(-1)
    ids = ids[torch.argsort(ratio[ids], descending=True)]
    if max_codes:
        ids = ids[:max_codes]
    rows = [{"code": int(i), "topic_count": int(topic_counts[i]), "contrast_count": int(contrast_counts[i]),
             "ratio": round(float(ratio[i]), 3), "p": float(f"{float(p[i]):.3g}")} for i in ids]
    return sorted(int(i) for i in ids), rows


def aligned_pairs(topic_ids: Sequence[int], contrast_ids: Sequence[int]) -> List[Tuple[int, int]]:
    """(topic position, contrast position) pairs that hold the same token inside a common run of the two
    token sequences, each with a next token to predict: the prefixes end alike, so the next token's
    likelihood can be compared across the two."""
    m = difflib.SequenceMatcher(None, list(topic_ids), list(contrast_ids), autojunk=False)
    out = []
    for i, j, n in m.get_matching_blocks():
        out.extend((i + d, j + d) for d in range(n) if i + d < len(topic_ids) - 1 and j + d < len(contrast_ids) - 1)
    return out


def answer_positions(pairs: Sequence[Tuple[int, int]], topic_nll: Sequence[float], contrast_nll: Sequence[float],
                     margin: float) -> Tuple[List[int], List[int]]:
    """The pairs where the topic's next token is at least `margin` nats likelier after the topic's prefix
    (topic_nll[k]) than after the contrast's (contrast_nll[k]: the same token, scored at the contrast position).
    Returns (topic positions, contrast positions)."""
    t_pos, c_pos = [], []
    for (t, c), tn, cn in zip(pairs, topic_nll, contrast_nll):
        if float(cn) - float(tn) >= margin:
            t_pos.append(t)
            c_pos.append(c)
    return t_pos, c_pos


def dependent_positions(topic_ids: Sequence[int], topic_pred: Sequence[int], contrast_pred: Sequence[int],
                        pairs: Sequence[Tuple[int, int]]) -> List[int]:
    """The topic positions i (aligned with contrast position j) whose next token topic_ids[i + 1] is the
    model's prediction after the topic's prefix (topic_pred[i]) and not after the contrast's (contrast_pred[j]):
    what the topic words alone make the model say. A template answer the model gives whatever the name is
    (a default it learnt from all topics of one form) is not among them: no mask of the topic can remove it."""
    return [i for i, j in pairs
            if int(topic_pred[i]) == int(topic_ids[i + 1]) and int(contrast_pred[j]) != int(topic_ids[i + 1])]


@dataclass
class Growth:
    """What the 'auto' selection did: codes tried, kept, skipped for the damage they did, and how many of the
    topic's name-dependent predictions were there before and are left with the mask."""

    codes: List[int]
    dependent: int
    left: int
    tried: int
    skipped: int

    def to_dict(self) -> dict:
        return {"dependent_predictions": self.dependent, "left": self.left, "candidates_tried": self.tried,
                "kept": len(self.codes), "skipped_for_damage": self.skipped}


def grow_mask(candidates: Sequence[int], still_said: Callable[[List[int]], int], damage: Callable[[List[int]], int],
              dependent: int, max_codes: int = 0, progress: bool = False) -> Growth:
    """Codes added one at a time, in the order given (most significant first), until still_said(codes) is 0
    (the topic's name-dependent predictions that the mask `codes` leaves in place), the candidates run out,
    or max_codes (0: no cap) are in. A candidate with damage(codes + [it]) > 0 (correct predictions the mask
    takes from text that must stay) is skipped. The mask returned ends with the last code that lowered
    still_said (a code may act only together with the ones after it, so none is dropped before that).

    Why a search and not a fixed p-value: how many codes a topic needs varies with the topic. On four planted
    countries the test at p < 0.01 chose 4 to 9 features and left 0 to 6 of 8 facts recalled; a looser test
    for all four would also take codes that a topic does not need (and risk kept text for nothing)."""
    from tqdm.auto import tqdm

    chosen: List[int] = []
    left, tried, skipped, useful = dependent, 0, 0, 0
    bar = tqdm(total=len(candidates), desc="trying codes", disable=not progress or not dependent, leave=False,
               dynamic_ncols=True)
    for code in candidates:
        if left == 0 or (max_codes and len(chosen) >= max_codes):
            break
        tried += 1
        bar.update(1)
        trial = chosen + [int(code)]
        if damage(trial) > 0:
            skipped += 1
            continue
        now = still_said(trial)
        chosen = trial
        if now < left:
            left, useful = now, len(chosen)
        bar.set_postfix(left=left)
    bar.close()
    # codes added after the last one that silenced a prediction changed nothing the search can see: they go
    # (on a topic whose facts do not need its name, every candidate was added for nothing and cost two facts
    # of other topics)
    return Growth(sorted(chosen[:useful]), dependent, left, tried, skipped)


# ------------------------------------------------------------------------------ model access


@torch.no_grad()
def nll_of(model, seq: torch.Tensor, positions: Sequence[int], tokens: Sequence[int]) -> List[float]:
    """NLL of token tokens[i] as the next token after seq[: positions[i] + 1], one forward pass."""
    if not len(positions):
        return []
    device = model_device(model)
    logits = model(input_ids=seq.unsqueeze(0).to(device)).logits[0]
    pos = torch.as_tensor(list(positions), dtype=torch.long, device=logits.device)
    tok = torch.as_tensor(list(tokens), dtype=torch.long, device=logits.device)
    lp = torch.log_softmax(logits[pos].float(), dim=-1)
    return (-lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)).cpu().tolist()


@torch.no_grad()
def predictions(model, seqs: Sequence[torch.Tensor], pad_id: int, batch_size: int) -> List[torch.Tensor]:
    """Per sequence (T,): the model's argmax next token after each prefix (teacher forced)."""
    out = []
    for b in range(0, len(seqs), batch_size):
        chunk = list(seqs[b:b + batch_size])
        tf = teacher_forced(model, chunk, pad_id)
        out.extend(tf.predictions[i, :len(s)] for i, s in enumerate(chunk))
    return out


def _hits(seqs: Sequence[torch.Tensor], preds: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Per sequence (T-1,): whether the prediction after each prefix is the text's next token."""
    return [p[:-1] == s[1:] for s, p in zip(seqs, preds)]


def mask_modes(mode: str, select: str, has_keep: bool) -> List[str]:
    """The mask modes a request tries, in order: the configured one, or for 'auto' 'zero', then 'negate' where
    the search can see its side effects (select 'auto' with keep texts)."""
    if mode != "auto":
        return [mode]
    return ["zero", "negate"] if select == "auto" and has_keep else ["zero"]


def _search(model, handle: "CodebookHandle", rows: Sequence[dict], t_seqs, c_seqs, k_seqs, pad: int,
            config: CodeForgetConfig, modes: Sequence[str]) -> Tuple[Growth, str, List[str]]:
    """The 'auto' selection with the bottleneck attached to `model` (see grow_mask), once per mask mode in `modes`
    until one leaves nothing (a later mode is kept only if it leaves less). The candidates are the test's codes at
    pool_p, most significant first; the text that must stay is the contrast and the keep texts. What the unmasked
    model predicts does not depend on the mode, so it is measured once. Returns (the search kept, its mode, the
    modes tried)."""
    order = []
    for r in sorted(rows, key=lambda r: (r["p"], -r["ratio"], r["code"])):
        if r["code"] not in order:
            order.append(r["code"])
    handle.set_codes([], modes[0])
    t_pred = predictions(model, t_seqs, pad, config.batch_size)
    c_pred = predictions(model, c_seqs, pad, config.batch_size)
    dep = [dependent_positions(t.tolist(), tp, cp, aligned_pairs(t.tolist(), c.tolist()))
           for t, c, tp, cp in zip(t_seqs, c_seqs, t_pred, c_pred)]
    stay = list(c_seqs) + list(k_seqs)
    stay_hits = _hits(stay, c_pred + predictions(model, k_seqs, pad, config.batch_size))
    with_dep = [i for i, d in enumerate(dep) if d]
    mode = modes[0]

    def still_said(codes: List[int]) -> int:
        handle.set_codes(codes, mode)
        preds = predictions(model, [t_seqs[i] for i in with_dep], pad, config.batch_size)
        total = 0
        for i, p in zip(with_dep, preds):
            d = torch.as_tensor(dep[i])
            total += int((p[d] == t_seqs[i][d + 1]).sum())
        return total

    def damage(codes: List[int]) -> int:
        handle.set_codes(codes, mode)
        now = _hits(stay, predictions(model, stay, pad, config.batch_size))
        return sum(int((before & ~after).sum()) for before, after in zip(stay_hits, now))

    best, best_mode, tried = None, modes[0], []
    try:
        for mode in modes:  # read by still_said / damage
            if best is not None and best.left == 0:
                break
            tried.append(mode)
            growth = grow_mask(order, still_said, damage, sum(len(d) for d in dep), config.max_codes, config.progress)
            if best is None or growth.left < best.left:
                best, best_mode = growth, mode
    finally:
        handle.set_codes([], modes[0])
    return best, best_mode, tried


def _answer_positions(model, t_seqs, c_seqs, config: CodeForgetConfig):
    """Per topic / contrast text: the aligned positions where the topic's prefix makes the topic's next token
    likelier than the contrast's prefix does (a contrast with the name swapped out, or another topic's
    text of the same form)."""
    t_only, c_only = [], []
    for t, c in zip(t_seqs, c_seqs):
        pairs = aligned_pairs(t.tolist(), c.tolist())
        nxt = [int(t[i + 1]) for i, _ in pairs]
        tn = nll_of(model, t, [i for i, _ in pairs], nxt)
        cn = nll_of(model, c, [j for _, j in pairs], nxt)
        tp, cp = answer_positions(pairs, tn, cn, config.answer_margin)
        t_only.append(tp)
        c_only.append(cp)
    return t_only, c_only


@dataclass
class CodeForgetResult:
    codes: List[int]
    manifest: dict
    output_dir: Optional[Path] = None
    # the selection's statistics (positions counted, each code's topic / contrast counts, the search's counts):
    # returned to the caller, never written, since a holder of the base, the codebook and a candidate text
    # could recompute them and compare
    stats: dict = field(default_factory=dict)


def forget_topic(config: CodeForgetConfig, base_model, tokenizer, codebook_dir: str | Path,
                 topic_texts: Sequence[str], contrast_texts: Optional[Sequence[str]] = None,
                 topic_words: Optional[Sequence[str]] = None, output_dir: Optional[str | Path] = None,
                 overwrite: bool = False, force: bool = False, base_name: Optional[str] = None,
                 keep_texts: Optional[Sequence[str]] = None) -> CodeForgetResult:
    """One zero-shot forget request: topic texts in, a code mask out (written to output_dir if given).

    The contrast is `contrast_texts`, or built from `topic_words` by make_contrast. Code activations
    are counted with the bare codebook (no masks), so requests are independent and stack as sets.
    With `select: auto` the mask grows until the topic's name-dependent predictions are gone (grow_mask),
    never at the cost of a correct prediction on the contrast or on `keep_texts` (text that must stay:
    other topics of the same form, say); the request's `status` is 'forgotten' when none is left,
    'partial' when some are, 'not_name_bound' when there were none to begin with. The bottleneck is
    removed from `base_model` again before returning.
    """
    t0 = time.time()
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    if not topic_texts:
        raise InputError("the topic set is empty")
    if contrast_texts is None:
        if not topic_words:
            raise InputError("give contrast texts (--contrast) or the topic words to swap out (--topic-words)")
        contrast_texts = make_contrast(topic_texts, topic_words)
        contrast_source = "topic-words"
    else:
        contrast_source = "file"
    if not contrast_texts:
        raise InputError("the contrast set is empty")
    if keep_texts and config.select != "auto":
        raise InputError("keep texts are read by select 'auto' only (select 'test' runs no forward pass with the mask)")
    if (config.positions != "all" or config.select == "auto") and len(contrast_texts) != len(topic_texts):
        what = f"positions={config.positions!r}" if config.positions != "all" else "select='auto'"
        raise InputError(f"{what} aligns each topic text with its contrast text: got {len(topic_texts)} topic and "
                         f"{len(contrast_texts)} contrast texts (give one contrast text per topic text, or select 'test')")
    codebook = read_codebook(codebook_dir)
    modes = mask_modes(config.mode, config.select, bool(keep_texts))
    mode, tried_modes = modes[0], []
    if codebook.config.kind == "sae" and config.mode == "block":
        raise InputError("an SAE's features cannot be blocked: use mode 'zero' or 'negate'")
    fp = base_fingerprint(base_model)
    check_base(codebook.manifest, fp, where=str(codebook_dir), force=force)
    salt = config.hash_salt or new_salt()
    store_key(salt)  # the ids' key stays with the operator; manifests name it by id (idkeys.py)
    request_id = config.request_id or str(uuid.uuid4())

    def encode(texts):
        return [torch.tensor(tokenizer(t, add_special_tokens=True)["input_ids"][:config.max_length], dtype=torch.long)
                for t in texts]

    pad = tokenizer.pad_token_id
    t_seqs, c_seqs, k_seqs = encode(topic_texts), encode(contrast_texts), encode(keep_texts or [])
    auto = config.select == "auto"
    p_cut = config.pool_p if auto else config.max_p  # 'auto': a pool of candidates; the search picks from it
    growth: Optional[Growth] = None
    model = load_codebook_model(base_model, codebook_dir, (), force=force)
    handle: CodebookHandle = model.icu_codebook
    codes, rows, counted = [], [], {}
    try:
        if config.positions in ("all", "both"):
            t_counts, t_pos = count_code_activations(model, handle.layers, t_seqs, pad, config.batch_size)
            c_counts, c_pos = count_code_activations(model, handle.layers, c_seqs, pad, config.batch_size)
            got, got_rows = select_topic_codes(t_counts, t_pos, c_counts, c_pos, config.min_ratio, p_cut,
                                               config.bonferroni, config.min_count, 0 if auto else config.max_codes)
            codes += got
            rows += [dict(r, positions="all") for r in got_rows]
            counted["all"] = {"topic": t_pos, "contrast": c_pos, "active_on_topic": int((t_counts > 0).sum())}
        if config.positions in ("answers", "both"):
            t_only, c_only = _answer_positions(model, t_seqs, c_seqs, config)
            a_counts, a_pos = count_code_activations(model, handle.layers, t_seqs, pad, config.batch_size, only=t_only)
            b_counts, b_pos = count_code_activations(model, handle.layers, c_seqs, pad, config.batch_size, only=c_only)
            if a_pos and b_pos:
                got, got_rows = select_topic_codes(a_counts, a_pos, b_counts, b_pos, config.min_ratio, p_cut,
                                                   config.bonferroni, config.min_count, 0 if auto else config.max_codes)
                codes += got
                rows += [dict(r, positions="answers") for r in got_rows]
            counted["answers"] = {"topic": a_pos, "contrast": b_pos, "active_on_topic": int((a_counts > 0).sum())}
        if auto:
            growth, mode, tried_modes = _search(model, handle, rows, t_seqs, c_seqs, k_seqs, pad, config, modes)
            kept = set(growth.codes)
            codes, rows = list(growth.codes), [r for r in rows if r["code"] in kept]
    finally:
        handle.remove()
        del model.icu_codebook
    codes = sorted(set(codes))
    t_pos = counted.get("all", counted.get("answers"))["topic"]
    c_pos = counted.get("all", counted.get("answers"))["contrast"]
    t_counts_active = max(v["active_on_topic"] for v in counted.values())
    stats = {"topic_positions": t_pos, "contrast_positions": c_pos, "codes_active_on_topic": t_counts_active,
             "positions_counted": counted, "kept": rows}
    # the file names the request, its codes and how they were chosen; no count of the topic's tokens, positions or
    # predictions (stats, returned only): with the base and the codebook they would let a holder test a candidate
    request = {
        "request_id": request_id,
        "created_at": utc_now(),
        "codes": codes,
        "topic": {"count": len(topic_texts), "ids": [sample_id(t, salt) for t in topic_texts]},
        "contrast": {"source": contrast_source, "count": len(contrast_texts), "topic_words": len(topic_words or [])},
        "selection": {"config": config.to_dict(), "tested_codes": codebook.total_codes, "rule": config.select},
        "wall_time_s": round(time.time() - t0, 3),
    }
    if growth is not None:
        stats["search"] = dict(growth.to_dict(), keep_texts=len(k_seqs), modes_tried=tried_modes, mode=mode)
        request["selection"].update(mode=mode, keep_texts=len(k_seqs))
        # nothing name-dependent to begin with: the model says the same with the topic words swapped out (or does
        # not know the text at all); a mask cannot act on that, and "forgotten" would claim what was not checked
        request["status"] = ("not_name_bound" if growth.dependent == 0 else
                             "forgotten" if growth.left == 0 else "partial")
    base = {"name_or_path": base_name or getattr(base_model.config, "_name_or_path", None),
            "quantized": bool(getattr(base_model, "is_loaded_in_4bit", False)), "fingerprint": fp}
    cb = {"sha256": codebook.sha256, "request_id": codebook.manifest.get("request_id"),
          "num_codes": codebook.config.num_codes, "layer_index": codebook.layer_index,
          "layer_indices": codebook.layer_indices, "kind": codebook.config.kind, "site": codebook.config.site}
    manifest = {"request_id": request_id, "mode": mode, "codebook": cb, "base": base, "codes": codes,
                "requests": [request], "id_key": key_id(salt)}
    out = None
    if output_dir is not None:
        manifest = write_code_mask([request], mode, cb, base, output_dir, overwrite, extra={"id_key": key_id(salt)})
        out = Path(output_dir)
    return CodeForgetResult(codes, manifest, out, stats)
