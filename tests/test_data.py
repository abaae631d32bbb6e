"""Reading inputs: formats, and one-line errors for everything malformed."""

import pytest

from icu_peft.data import nearest_neighbours, read_texts, sample_id, tokenize_texts
from icu_peft.errors import InputError


def test_reads_all_three_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "a.csv").write_text('id,text\n1,"one, with comma"\n2,two\n')
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_texts(tmp_path / "a.csv") == ["one, with comma", "two"]
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "", "holds no samples"),
    ("bad.jsonl", '{"text": "ok"}\n{not json\n', "not valid JSON"),
    ("nofield.jsonl", '{"body": "x"}\n', "no field 'text'"),
    ("nocol.csv", "a,b\n1,2\n", "no column 'text'"),
    ("empty.csv", "", "empty"),
    ("blank.txt", "\n\n", "holds no samples"),
    ("data.xlsx", "x", "unsupported file type"),
])
def test_bad_files_give_one_line_errors(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(InputError, match=message) as e:
        read_texts(p)
    assert "\n" not in str(e.value)


def test_missing_file_and_binary_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(InputError, match="not UTF-8"):
        read_texts(tmp_path / "bin.txt")


def test_sample_ids_are_salted_and_stable():
    assert sample_id("secret", "00" * 16) == sample_id("secret", "00" * 16)
    assert sample_id("secret", "00" * 16) != sample_id("secret", "11" * 16)
    assert "secret" not in sample_id("secret", "00" * 16)


def test_too_short_samples_are_refused(tiny_model_dir):
    from icu_peft.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(InputError, match="sample #2 has"):
        tokenize_texts(["record 12: amber basalt cobalt dune ember", "oak"], tok, 200, "00" * 16, min_tokens=11)
    ts = tokenize_texts(["record 12: amber basalt cobalt dune ember fjord"], tok, 5, "00" * 16)
    assert ts.truncated == 1 and len(ts.input_ids[0]) == 5


def test_nearest_neighbours_exact():
    import torch

    pool = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 3.0]])
    q = torch.tensor([[9.0, 1.0], [0.0, 2.0]])
    assert nearest_neighbours(q, pool, 1).tolist() == [[1], [2]]
    assert nearest_neighbours(q, pool, 2).tolist() == [[1, 0], [2, 0]]
    assert nearest_neighbours(q, pool, 5).shape == (2, 3)
