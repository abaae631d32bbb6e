"""Calibrated forgetting with the defaults on tiny memorisers built in code (no flags but the shape).

    python benchmarks/calibration_tiny.py LAYERS HIDDEN SEED [config_field=value ...]

Builds a Llama of the given shape that memorises 24 random-word records (8 to forget, 16 to keep)
and never sees 16 more, runs `forget` with ICUConfig defaults and prints the status, steps, band,
retain MA and the membership-inference AUCs. Results: docs/BENCHMARKS.md.
"""
import os
import sys, time, logging, torch
from icu_peft.testing import build_tiny_memorizer, random_sentences
from icu_peft import ICUConfig
from icu_peft.unlearner import forget
logging.basicConfig(level=logging.INFO, format="%(message)s")
logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(1)
layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
hidden = int(sys.argv[2]) if len(sys.argv) > 2 else 64
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 5
texts = random_sentences(40, seed=seed)
fg, rt, un = texts[:8], texts[8:24], texts[24:40]
d = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"icu_calib_mem_{layers}_{hidden}_{seed}")
import os
if not os.path.exists(d + "/model.safetensors"):
    print(build_tiny_memorizer(d, fg + rt, un, steps=400, layers=layers, hidden=hidden, seed=seed))
extra = dict(a.split("=") for a in sys.argv[4:])
for k, v in list(extra.items()):
    try: extra[k] = float(v) if "." in v or "e" in v else int(v)
    except ValueError: pass
t = time.time()
r = forget(ICUConfig(model=d, progress=False, **extra), fg, rt, un)
rep = r.report
print("status", rep["status"], rep["forget"]["forgotten"], "/", rep["forget"]["count"], "steps", rep["steps"], "lr", rep["learning_rate"], f"{time.time()-t:.0f}s")
print("band", {k: round(v, 3) if isinstance(v, float) else v for k, v in rep["band"].items()})
print("forget before", rep["forget"]["before"], "after", rep["forget"]["after"])
print("retain", rep["retain"]["before"]["ma"], "->", rep["retain"]["after"]["ma"])
print("mia", {ph: {k: round(v["auc"], 3) for k, v in rep["mia"][ph].items()} for ph in ("before", "after")})
print([ (round(s["after"]["nll"],2), round(s["after"]["ma"],2), s.get("band")) for s in rep["samples"]])
