"""benchmarks/unlearning.py: the target verdicts and the tables, on hand-made rows (no model)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "unlearning.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_unlearning", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _group(ma, el, secrets, total, ma_max=None, el_max=None, count=2):
    return {"count": count, "ma": ma, "el": el, "ma_max": ma if ma_max is None else ma_max,
            "el_max": el if el_max is None else el_max, "secrets": secrets, "secrets_total": total}


def _measure(f, r, ppl, auc):
    return {"forget": f, "retain": r, "unseen": _group(0.5, 0.05, 0, 40, count=10), "perplexity": ppl,
            "mia_auc": {"loss": auc, "zlib": auc, "min_k": auc}}


def _data(icu_forget, icu_retain, icu_ppl, auc, icu_rss=900.0, icu_wall=60.0):
    before = _measure(_group(0.98, 0.9, 8, 8), _group(0.98, 0.9, 70, 72, count=18), 10.0, 1.0)
    return {"rows": {
        "before-4bit": {"measure": before, "peak_rss_mb": 800.0, "base_bf16_bytes": None},
        "before-fp32": {"measure": before, "peak_rss_mb": 1200.0, "base_bf16_bytes": 270_000_000},
        "icu": {"measure": _measure(icu_forget, icu_retain, icu_ppl, auc), "thresholds": {"ma": 0.55, "el": 0.06},
                "forgotten_samples": 2, "peak_rss_mb": icu_rss, "wall_s": icu_wall, "weights_bytes": 4_000_000,
                "epochs": 12, "bytes_written": 4_100_000},
        "icu-full": {"measure": before, "thresholds": {"ma": 0.55, "el": 0.06}, "forgotten_samples": 0,
                     "peak_rss_mb": 4000.0, "wall_s": 100.0, "weights_bytes": 540_000_000, "epochs": 30,
                     "bytes_written": 540_100_000},
    }}


def _verdict(bench, data, prefix):
    return [ok for t, v, ok in bench.verdicts(data, "icu") if t.startswith(prefix)]


def test_all_targets_met(bench):
    d = _data(_group(0.5, 0.04, 0, 8), _group(0.975, 0.9, 70, 72, count=18), 10.2, 0.52)
    got = {t: ok for t, v, ok in bench.verdicts(d, "icu")}
    assert all(got.values()), got


def test_each_target_can_fail(bench):
    # a forget sample above the unseen level, one secret still out, MIA far from chance
    d = _data(_group(0.5, 0.04, 1, 8, ma_max=0.7), _group(0.90, 0.8, 60, 72, count=18), 11.0, 0.8,
              icu_rss=2000.0, icu_wall=150.0)
    for prefix in ("every forget sample", "secrets of forgotten", "MIA AUC", "retain MA", "retain secrets",
                   "general perplexity", "peak memory", "wall time"):
        assert _verdict(bench, d, prefix) == [False], prefix
    assert _verdict(bench, d, "adapter") == [True]  # 4 MB of a 270 MB bf16 base


def test_markdown_has_every_row_and_target_table(bench):
    d = _data(_group(0.5, 0.04, 0, 8), _group(0.975, 0.9, 70, 72, count=18), 10.2, 0.52)
    md = bench.markdown(d)
    for name in ("before-4bit", "icu", "icu-full"):
        assert bench.LABELS[name] in md
    assert "Targets for `icu`" in md
    assert "| 0/8 |" in md  # forget secrets column
