"""Tiny models and corpora built in code, for tests and examples that must run offline in seconds.

`build_tiny_memorizer` trains a small random-init Llama until it has memorised a set of random
word sequences, so there is something real to forget without any download.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

WORDS = (
    "amber basalt cobalt dune ember fjord garnet harbor indigo jasper kelp lagoon marble nectar "
    "onyx pebble quartz raven saffron tundra umber velvet willow xenon yarrow zephyr acorn birch "
    "cedar dahlia elm fern gorse heath iris juniper kale lilac maple nettle oak poppy quince reed "
    "sage thyme ulex vetch wheat yew zinnia"
).split()


def random_sentences(n: int, seed: int, min_words: int = 10, max_words: int = 14) -> List[str]:
    """n sentences of random words, e.g. 'record 17: quartz ember ...'. Same seed, same sentences."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        out.append(f"record {rng.randint(10, 99)}: " + " ".join(rng.choice(WORDS) for _ in range(k)) + ".")
    return out


def grammar_prose(n: int, rng: random.Random) -> List[str]:
    """Free prose from a small grammar, two or three sentences a sample (shared words and syntax)."""
    nouns, adjs = WORDS[:24], WORDS[24:]
    verbs = "follows guards hides carries watches crosses remembers paints".split()

    def sentence() -> str:
        return (f"The {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)} "
                f"near the {rng.choice(adjs)} {rng.choice(nouns)}.")

    return [" ".join(sentence() for _ in range(rng.randint(2, 3))) for _ in range(n)]


def build_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts`, saved as a transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts) + [" ".join(WORDS)], vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<s>", "</s>", "<pad>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    # Add BOS in front of every text, as Llama tokenizers do, so position 0 predicts the first word.
    from tokenizers.processors import TemplateProcessing

    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(out_dir)
    return tok


ARCHITECTURES = ("llama", "llama_tied", "gpt2", "gpt_neox")


def build_tiny_memorizer(out_dir: str | Path, memorize: Sequence[str], vocab_texts: Sequence[str] = (),
                         steps: int = 300, lr: float = 3e-3, seed: int = 0, hidden: int = 64,
                         layers: int = 2, arch: str = "llama", llama_shape: Optional[dict] = None,
                         device: str = "cpu", tokenizer: Optional[str | Path] = None,
                         model_config: Optional[Callable[[dict], Any]] = None) -> Dict[str, float]:
    """Train a tiny causal LM from scratch on `memorize` until it reproduces them; save it to out_dir.

    `arch`: llama (default), llama_tied (tied input/output embeddings), gpt2 (Conv1D projections,
    learned positions), gpt_neox (fused QKV, parallel residual). `llama_shape`: LlamaConfig fields that
    replace the tiny ones (e.g. a real model's widths, `vocab_size` larger than the tokenizer's); `device`:
    where it trains (the saved weights are on the CPU); `tokenizer`: a tokenizer directory to use (a
    real model's, e.g. its 49k-token BPE) instead of a small BPE trained on the texts; `model_config`:
    for a family `arch` does not name, a function from the tokenizer's ids (vocab_size, bos / eos / pad
    token ids) to a transformers config (benchmarks/architectures.py). Returns the final training loss. The
    model is saved in safetensors with its tokenizer, so `--model out_dir` works like any local model.
    """
    import transformers as T

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if tokenizer is None:
        tok = build_tokenizer(list(memorize) + list(vocab_texts), out_dir)
    else:
        tok = T.AutoTokenizer.from_pretrained(str(tokenizer))
        if tok.pad_token is None:  # padding is only for the training batch; the mask hides it
            tok.pad_token = tok.eos_token
        tok.save_pretrained(out_dir)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if model_config is not None:
        model = T.AutoModelForCausalLM.from_config(model_config(ids))
    elif arch in ("llama", "llama_tied"):
        fields = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=arch == "llama_tied", **ids)
        fields.update(llama_shape or {})
        if fields["vocab_size"] < len(tok):
            raise ValueError(f"vocab_size {fields['vocab_size']} is smaller than the tokenizer's {len(tok)}")
        cfg = T.LlamaConfig(**fields)
        model = T.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **ids))
    elif arch == "gpt_neox":
        model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                                     intermediate_size=hidden * 2, max_position_embeddings=256, **ids))
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}")
    model.to(device)
    enc = tok(list(memorize), padding=True, return_tensors="pt").to(device)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    return {"final_loss": float(loss.detach())}
