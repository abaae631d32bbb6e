"""`icu-peft forget` with no flags on tiny memorisers of many architectures (their configs built in code).

    OMP_NUM_THREADS=1 python benchmarks/architectures.py --workdir W [--archs qwen2,mistral,...] \
        [--forget 6 --retain 18 --unseen 16 --hidden 64 --steps 250] [--config extra.yaml]

For each architecture: a 2-layer model of that family with random weights trained until it reproduces
`--forget` + `--retain` random-word records (testing.random_sentences); `--unseen` more records it never saw
go to `--unseen`, as many again are held out for the attack. Then `icu-peft forget` with no tuning flag
(`--config` adds a recipe) and `icu-peft eval --metrics mia` against the held-out records. One JSON line per
architecture on stdout: status, exit code, steps, retain MA before / after, the request's own AUCs (against
the given never-seen records) and the held-out ones, and the held-out records' perplexity before / after
(`same_kind_ppl`). What it checks: that nothing in the loop assumes one
architecture (module names, fused projections, biases, tied or untied heads) and how calibrated the result
is on each. Results: docs/BENCHMARKS.md, "Calibrated forgetting".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from heldout_attack import same_kind_ppl  # this directory is the script's: sys.path[0]

CONFIGS = {  # (config class, fields beyond the shared ones); `common` is added where the class takes it
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4)),
    "phi": ("PhiConfig", {}),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16)),
    "olmo": ("OlmoConfig", dict(num_key_value_heads=4)),
    "stablelm": ("StableLmConfig", dict(num_key_value_heads=4)),
    "opt": ("OPTConfig", None),
    "falcon": ("FalconConfig", None),
    "bloom": ("BloomConfig", None),
    "gptj": ("GPTJConfig", None),
}


def build_config(arch: str, hidden: int, ids: dict):
    import transformers as T

    name, extra = CONFIGS[arch]
    cls = getattr(T, name)
    if extra is not None:
        return cls(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                   max_position_embeddings=128, **extra, **ids)
    if arch == "opt":
        return cls(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, ffn_dim=2 * hidden,
                   word_embed_proj_dim=hidden, max_position_embeddings=128, **ids)
    if arch == "falcon":
        return cls(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, **ids)
    if arch == "bloom":
        return cls(hidden_size=hidden, n_layer=2, n_head=4, **ids)
    return cls(n_embd=hidden, n_layer=2, n_head=4, n_positions=128, rotary_dim=8, **ids)  # gptj


def build(arch: str, w: Path, a) -> float:
    """Write W/{forget,retain,unseen,held_out}.jsonl and the trained memoriser in W/model; its final loss."""
    from functools import partial

    from icu_peft.testing import build_tiny_memorizer, random_sentences

    texts = random_sentences(a.forget + a.retain + 2 * a.unseen, seed=a.seed)
    cut = [0, a.forget, a.forget + a.retain, a.forget + a.retain + a.unseen, len(texts)]
    w.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(("forget", "retain", "unseen", "held_out")):
        (w / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[cut[k]:cut[k + 1]]))
    # the never-seen records join the tokenizer's vocabulary only, as in fresh_memoriser.py
    fit = build_tiny_memorizer(w / "model", texts[:cut[2]], texts[cut[2]:], steps=a.steps, seed=a.seed,
                               model_config=partial(build_config, arch, a.hidden))
    return fit["final_loss"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icu_peft.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ))


def run(arch: str, a) -> dict:
    w = a.workdir / arch
    fit = None if (w / "model" / "model.safetensors").exists() else build(arch, w, a)
    out = w / f"adapter_{a.label}"
    argv = ["forget", "--model", str(w / "model"), "--forget", str(w / "forget.jsonl"), "--retain",
            str(w / "retain.jsonl"), "--unseen", str(w / "unseen.jsonl"), "--out", str(out), "--overwrite", "--no-progress"]
    p = cli(*argv, *(["--config", str(a.config)] if a.config else []))
    row = {"arch": arch, "label": a.label, "exit": p.returncode, "final_training_loss": fit}
    if not (out / "forget_manifest.json").is_file():
        return {**row, "error": p.stderr.strip().splitlines()[-1:]}
    m = json.loads((out / "forget_manifest.json").read_text())
    row.update(status=m["status"], forgotten=m["forget"]["forgotten"], count=m["forget"]["count"], steps=m["steps"],
               retain_ma=[m["retain"]["before"]["ma"], m["retain"]["after"]["ma"]],
               auc={k: v["auc"] for k, v in (m.get("mia") or {}).get("after", {}).items()})
    ev = cli("eval", "--model", str(w / "model"), "--adapter", str(out), "--data", str(w / "forget.jsonl"),
             "--unseen", str(w / "held_out.jsonl"), "--metrics", "mia", "--json")
    try:
        mia = json.loads(ev.stdout)["mia"]
        row["held_out_auc"] = {k: round(v["auc"], 3) for k, v in mia.items() if isinstance(v, dict) and "auc" in v}
    except (ValueError, KeyError, TypeError):
        row["held_out_auc"] = None
    row["same_kind_ppl"] = same_kind_ppl(w / "model", w / "held_out.jsonl", out)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--archs", default=",".join(CONFIGS), help=f"any of {','.join(CONFIGS)}")
    ap.add_argument("--forget", type=int, default=6)
    ap.add_argument("--retain", type=int, default=18)
    ap.add_argument("--unseen", type=int, default=16, help="given to --unseen; as many more are held out")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=250, help="training steps of each memoriser (full batch)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--label", default="defaults", help="names the adapters (adapter_LABEL)")
    ap.add_argument("--config", type=Path, default=None, help="a recipe YAML for `icu-peft forget --config`")
    a = ap.parse_args()
    archs = [x.strip() for x in a.archs.split(",") if x.strip()]
    unknown = [x for x in archs if x not in CONFIGS]
    if unknown:
        ap.error(f"unknown architectures: {', '.join(unknown)}")
    ok = True
    for arch in archs:
        row = run(arch, a)
        ok = ok and row.get("exit") == 0
        print(json.dumps(row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
