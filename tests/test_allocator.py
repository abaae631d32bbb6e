"""The C allocator settings (allocator.py): the fixed mmap threshold and the heap for roll-outs."""

import pytest
import torch

import icu_peft.allocator as A


class _FakeLibc:
    def __init__(self, calls):
        self.calls = calls

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param.value, value.value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad.value))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    calls = []
    monkeypatch.setattr(A, "_libc", lambda: _FakeLibc(calls))
    monkeypatch.setattr(A, "_depth", 0)
    return calls


def test_heap_blocks_raises_the_threshold_then_restores_it_and_trims(fake_libc, monkeypatch):
    monkeypatch.setattr(A, "_done", True)
    monkeypatch.setattr(A, "_fixed", 65536)
    with A.heap_blocks():
        assert fake_libc == [("mallopt", A.M_MMAP_THRESHOLD, A.HEAP_BLOCKS_BYTES)]
        with A.heap_blocks():  # nested: nothing more, and the outer one is not undone early
            pass
        assert len(fake_libc) == 1
    assert fake_libc[1:] == [("mallopt", A.M_MMAP_THRESHOLD, 65536), ("malloc_trim", 0)]
    with pytest.raises(RuntimeError):  # restored on an error too
        with A.heap_blocks():
            raise RuntimeError("boom")
    assert fake_libc[-2:] == [("mallopt", A.M_MMAP_THRESHOLD, 65536), ("malloc_trim", 0)]
    assert A._depth == 0


def test_heap_blocks_does_nothing_where_the_threshold_was_not_fixed_here(fake_libc, monkeypatch):
    monkeypatch.setattr(A, "_done", False)  # not glibc, or MALLOC_MMAP_THRESHOLD_ in the environment
    with A.heap_blocks():
        pass
    assert fake_libc == []


def test_greedy_roll_outs_run_inside_heap_blocks(monkeypatch):
    from icu_peft import metrics

    inside = []

    class Spy:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.append(False)

    monkeypatch.setattr(metrics, "heap_blocks", lambda: Spy())
    seen = []
    real = metrics._greedy_continue
    monkeypatch.setattr(metrics, "_greedy_continue", lambda *a, **k: seen.append(list(inside)) or real(*a, **k))

    class Tiny(torch.nn.Module):  # logits favour token (last + 1) % 5
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # where model_device looks

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                    logits_to_keep=None):
            logits = torch.nn.functional.one_hot((input_ids + 1) % 5, 5).float()
            return type("Out", (), {"logits": logits, "past_key_values": None})()

    out = metrics.greedy_continue(Tiny(), [torch.tensor([0, 1]), torch.tensor([3])], [3, 2], pad_id=0)
    assert out == [[2, 3, 4], [4, 0]]
    assert seen == [[True]] and inside == [True, False]


def _spy_heap_blocks(monkeypatch, unlearner_module) -> list:
    """Replace the loop's heap_blocks with a context that records each entry (one item per step inside it)."""
    entered = []

    class Spy:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(unlearner_module, "heap_blocks", lambda *a, **k: Spy())
    return entered


@pytest.mark.parametrize("on", [False, True])
def test_steps_take_their_blocks_from_the_heap_only_with_cpu_heap_steps(tiny_model_dir, tiny_corpus, monkeypatch, on):
    from conftest import quick_config

    import icu_peft.unlearner as U

    entered = _spy_heap_blocks(monkeypatch, U)
    r = U.forget(quick_config(tiny_model_dir, max_steps=3, min_epochs=3, cpu_heap_steps=on),
                 tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"])
    assert r.report["steps"] >= 1
    assert (len(entered) == r.report["steps"]) if on else not entered


@pytest.mark.parametrize("available_mb, later_steps_on_heap", [(10**6, True), (0, False)])
def test_auto_heap_steps_decide_after_the_first_step(tiny_model_dir, tiny_corpus, monkeypatch, available_mb,
                                                     later_steps_on_heap):
    """'auto': the first step runs with the fixed threshold and is measured; the later ones take the heap only
    where the memory available then holds HEAP_AUTO_MARGIN times that step's peak."""
    from conftest import quick_config

    import icu_peft.allocator as A
    import icu_peft.unlearner as U

    monkeypatch.setattr(A, "_done", True)  # as after the CLI fixed the threshold
    entered = _spy_heap_blocks(monkeypatch, U)
    monkeypatch.setattr(U, "free_memory_bytes", lambda device: available_mb * 2**20)
    r = U.forget(quick_config(tiny_model_dir, max_steps=3, min_epochs=3, cpu_heap_steps="auto"),
                 tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"])
    assert r.report["steps"] >= 2
    assert len(entered) == (r.report["steps"] - 1 if later_steps_on_heap else 0)


def test_heap_steps_auto_is_off_on_cuda_and_where_the_threshold_is_not_fixed(monkeypatch):
    import icu_peft.allocator as A

    monkeypatch.setattr(A, "_done", True)
    assert A.HeapSteps("auto", "cuda").pending is False and A.HeapSteps("auto", "cuda").begin() is False
    assert A.HeapSteps("auto", "cpu").pending is True
    assert A.HeapSteps(True, "cuda").begin() is True and A.HeapSteps(False, "cpu").begin() is False
    monkeypatch.setattr(A, "_done", False)
    assert A.HeapSteps("auto", "cpu").pending is False


def test_cpu_heap_steps_setting_is_checked():
    from icu_peft.config import ICUConfig
    from icu_peft.errors import InputError

    with pytest.raises(InputError, match="cpu_heap_steps"):
        ICUConfig(cpu_heap_steps="sometimes")


@pytest.mark.parametrize("available_mb, on", [(700, True), (500, False)])
def test_heap_steps_auto_compares_the_first_steps_peak_with_the_memory_available(monkeypatch, available_mb, on):
    import icu_peft.allocator as A

    status = {"VmRSS": 100 * 2**20, "VmHWM": 300 * 2**20}  # the first step peaked 200 MB over the resident memory
    monkeypatch.setattr(A, "_done", True)
    monkeypatch.setattr(A, "_status_bytes", lambda field: status[field])
    h = A.HeapSteps("auto", "cpu")
    assert h.begin() is False  # the measured step runs with the fixed threshold
    verdict = h.after_step(lambda: available_mb * 2**20)
    assert h.on is on and h.begin() is on and verdict.startswith("on" if on else "off") and "200 MB" in verdict
    assert h.after_step(lambda: 0) is None and h.on is on  # decided once
