"""One ICU training step with and without the frozen-prefix cache, side by side in one process.

    python benchmarks/step_speed.py [--model DIR] [--rounds 6] [--lora-layers 10]

The step has the demo's shape (icu_peft.demo.run.demo_icu_config): one forget record, its
neighbour and 8 retain records, LoRA r=8 in the last --lora-layers layers of a 4-bit base. The two
variants alternate, round 0 (which fills both caches) is dropped, and the medians and their ratio
are printed. --model defaults to the quick demo's planted SmolLM2 (run `icu-peft demo --quick` once
to create it); any local causal-LM directory works, the records are only token sequences here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from icu_peft.caches import CachedReference, FrozenPrefixBackbone
    from icu_peft.config import ICUConfig
    from icu_peft.demo.plant import planted_dir
    from icu_peft.demo.records import make_corpus
    from icu_peft.demo.run import DemoOptions
    from icu_peft.models import attach_lora, load_base_model, load_tokenizer
    from icu_peft.unlearner import _parts, adapter_disabled_reference, icu_step_backward

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local model directory (default: the quick demo's planted model)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--lora-layers", type=int, default=10)
    args = p.parse_args()
    q = DemoOptions.quick()
    corpus = make_corpus(q.num_people, q.num_unseen, q.forget_fraction, q.seed)
    model_dir = args.model or str(planted_dir(corpus.texts, q.plant))
    tok = load_tokenizer(model_dir)
    model = attach_lora(load_base_model(model_dir, quantize=True), 8, 16, 0.0, "all-linear", False,
                        last_layers=args.lora_layers)
    seqs = [torch.tensor(tok(t)["input_ids"][:128]) for t in corpus.forget_texts + corpus.retain_texts]
    forget, neighbours = seqs[:1], seqs[2:12]
    cfg = ICUConfig(forget_weight=2.0, learn_weight=1.0, kl_weight=3.0)
    reference = CachedReference(adapter_disabled_reference(model), 1 << 29)
    prefix = FrozenPrefixBackbone.build(_parts(model)[0], 1 << 29)
    if prefix is None:
        raise SystemExit("this model cannot be split at its lowest LoRA layer; nothing to compare")
    model.train()
    times = {"all layers": [], "prefix cached": []}
    for r in range(args.rounds + 1):
        for name, backbone in (("all layers", None), ("prefix cached", prefix)):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            icu_step_backward(model, forget, neighbours, tok.pad_token_id, cfg, reference, backbone=backbone)
            if r:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {model_dir}; LoRA in the last {args.lora_layers} layers; {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k}: median {v:.2f} s per step")
    print(f"  ratio prefix cached / all layers: {med['prefix cached'] / med['all layers']:.3f}")


if __name__ == "__main__":
    main()
