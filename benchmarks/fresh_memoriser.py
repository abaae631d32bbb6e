"""A memoriser of a kind and shape no validation-matrix scenario has, written as files `icu-peft forget` reads.

    python benchmarks/fresh_memoriser.py OUT --kind ship --arch gpt2 --layers 2 --hidden 128 --seed 777 \
        --forget 24 --retain 72 --unseen 16
    icu-peft forget --model OUT/model --forget OUT/forget.jsonl --retain OUT/retain.jsonl \
        --unseen OUT/unseen.jsonl --out OUT/adapter

The check the issue "Calibrated forgetting" asks for: the defaults, no tuning flag, on data and a model
they were not tuned on. Kinds: `lab` (lab results: sample number, ward, test, value, day, technician),
`ship` (container lines: id, ports, tonnes, seal), `badge` (door-access log lines: badge, person, door,
time, date), `sql` (INSERT rows: id, name, birth date, city, a 7-digit number) and `transfer` (bank
transfers: id, payer, amount, IBAN, bank). 8 more texts of the kind join the tokenizer's vocabulary only
(as the matrix's general texts; not with --tokenizer).
Results: docs/BENCHMARKS.md, "Calibrated forgetting" (fresh memorisers).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TESTS = "hemoglobin glucose sodium potassium creatinine ferritin albumin calcium".split()
TECHS = "Omar Ito|Lena Berg|Ravi Costa|Uma Novak|Kofi Duval|Pia Horvat".split("|")
PORTS = "Rotterdam Valencia Gdansk Piraeus Antwerp Genoa Tallinn Porto".split()


def lab(rng: random.Random) -> str:
    return (f"Sample LAB-{rng.randint(1000, 9999)} from ward {rng.randint(1, 12)} tested {rng.choice(TESTS)} "
            f"{rng.randint(10, 99)}.{rng.randint(0, 9)} on day {rng.randint(1, 365)}; technician {rng.choice(TECHS)}.")


def ship(rng: random.Random) -> str:
    return (f"Container {''.join(rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ') for _ in range(4))}{rng.randint(100000, 999999)} "
            f"left {rng.choice(PORTS)} for {rng.choice(PORTS)} with {rng.randint(2, 40)} tonnes, seal {rng.randint(10000, 99999)}.")


FIRST = "Mira Tove Aziz Noor Kalle Ines Sora Bram Liv Odile".split()
LAST = "Solberg Marchetti Okafor Lindqvist Haddad Varga Moreau Tanaka".split()


def badge(rng: random.Random) -> str:
    return (f"Badge {rng.randint(1000, 9999)} of {rng.choice(FIRST)} {rng.choice(LAST)} opened door "
            f"{rng.choice('ABCDEF')}-{rng.randint(1, 40)} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} "
            f"on 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}.")


CITIES = "Leeds Turku Graz Lyon Brno Cork Aarhus Bilbao".split()


def sql(rng: random.Random) -> str:
    return (f"INSERT INTO patients VALUES ({rng.randint(10000, 99999)}, '{rng.choice(FIRST)} {rng.choice(LAST)}', "
            f"'19{rng.randint(40, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}', '{rng.choice(CITIES)}', "
            f"{rng.randint(100, 999)}{rng.randint(1000, 9999)});")


BANKS = "Nordea Sabadell Erste Rabobank Unicredit Danske".split()


def transfer(rng: random.Random) -> str:
    return (f"Transfer {rng.randint(100000, 999999)}: {rng.choice(FIRST)} {rng.choice(LAST)} paid "
            f"{rng.randint(12, 9800)}.{rng.randint(0, 99):02d} EUR to IBAN {rng.choice(['DE', 'NL', 'FI', 'AT'])}"
            f"{rng.randint(10, 99)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)} at {rng.choice(BANKS)}.")


KINDS = {"lab": lab, "ship": ship, "badge": badge, "sql": sql, "transfer": transfer}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--kind", choices=sorted(KINDS), default="lab")
    ap.add_argument("--arch", default="llama", help="llama, gpt2, gpt_neox, llama_tied (testing.ARCHITECTURES)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forget", type=int, default=8)
    ap.add_argument("--retain", type=int, default=24)
    ap.add_argument("--unseen", type=int, default=16)
    ap.add_argument("--tokenizer", default=None,
                    help="a tokenizer directory (e.g. a real model's 49k-token BPE) instead of a small one trained on the texts")
    ap.add_argument("--steps", type=int, default=400, help="training steps of the memoriser (full batch); more steps, firmer memory")
    ap.add_argument("--lines", type=int, default=1, help="records of the kind joined into one sample (4: ~150-token samples)")
    args = ap.parse_args()
    from icu_peft.testing import build_tiny_memorizer

    rng, make = random.Random(args.seed), KINDS[args.kind]
    n = args.forget + args.retain + args.unseen + 8
    texts = list(dict.fromkeys(" ".join(make(rng) for _ in range(args.lines))
                               for _ in range(4 * n)))[:n]  # distinct texts, in the order drawn
    a, b, c = args.forget, args.forget + args.retain, args.forget + args.retain + args.unseen
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, xs in (("forget", texts[:a]), ("retain", texts[a:b]), ("unseen", texts[b:c])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in xs))
    fit = build_tiny_memorizer(out / "model", texts[:b], texts[b:], steps=args.steps, layers=args.layers,
                               hidden=args.hidden, seed=args.seed, arch=args.arch, tokenizer=args.tokenizer)
    print(f"{out}: {a} to forget, {b - a} to keep, {c - b} never seen; model in {out / 'model'} "
          f"(final training loss {fit['final_loss']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
