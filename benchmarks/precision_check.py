"""Does a forget adapter trained on the 4-bit base forget on the full-precision base too?

    python benchmarks/precision_check.py WORKDIR SCENARIO [METHOD]

Reads the memoriser and adapter that `benchmarks/validation_matrix.py --workdir WORKDIR` left for
SCENARIO (records, prose, code) and prints, for the base in NF4 and in float32, each forget sample's
NLL, MA and verdict (against the adapter's manifest) with and without the adapter. Results:
docs/CHANGELOG.md ("Validation matrix").
"""

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validation_matrix import build  # noqa: E402

from icu_peft.adapters import load_forget_adapters, read_manifest  # noqa: E402
from icu_peft.lifecycle import collect_leaves, verify_forget_set  # noqa: E402
from icu_peft.models import load_base_model, load_tokenizer  # noqa: E402

work, scenario = Path(sys.argv[1]), sys.argv[2]
method = sys.argv[3] if len(sys.argv) > 3 else "icu"
model, _, fg, *_ = build(scenario, work)
adapter = work / f"{scenario}_{method}_adapter"
manifest = read_manifest(adapter)
tok = load_tokenizer(str(model))
print("band", {k: round(v, 3) for k, v in manifest["band"].items() if isinstance(v, float)})
for quantize in (True, False):
    name = "nf4 " if quantize else "fp32"
    for with_adapter in (False, True):
        base = load_base_model(str(model), quantize=quantize)
        m = load_forget_adapters(base, [str(adapter)]) if with_adapter else base
        leaves = collect_leaves(m) if with_adapter else [(adapter, manifest)]
        rows = verify_forget_set(m, tok, fg, leaves)["samples"]
        print(name, "adapter" if with_adapter else "base   ",
              " ".join(f"{r['nll']:.2f}/{r['ma']:.2f}/{'F' if r['forgotten'] else '-'}" for r in rows))
