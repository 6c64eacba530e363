"""Every data format, and every kind of bad input, with the message naming file, line and field."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from rlhfkit.data import (edits_to_preferences, load_edits, load_preferences, load_prompts, load_ratings, load_sft,
                          read_records, split_transcripts)
from rlhfkit.errors import UserError

HH_CHOSEN = "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the cat sit?"
HH_REJECTED = "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."


def test_prompts_formats(jsonl):
    path = jsonl([{"prompt": "Once upon"}, {"messages": [{"role": "user", "content": "hi"}]},
                  {"prompt": "x", "reference": "ref"}, {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    prompts = load_prompts(path)
    assert prompts[0].prompt == "Once upon"
    assert prompts[1].prompt == [{"role": "user", "content": "hi"}]
    assert prompts[2].extra == {"reference": "ref"}
    assert prompts[3].prompt.endswith("Tell me a joke.\n\nAssistant:")


def test_sft_formats(jsonl):
    path = jsonl([{"prompt": "a", "completion": "b"}, {"text": "whole story"},
                  {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    ex = load_sft(path)
    assert (ex[0].prompt, ex[0].completion) == ("a", "b")
    assert (ex[1].prompt, ex[1].completion) == ("", "whole story")
    assert ex[2].prompt == [{"role": "user", "content": "q"}]
    assert ex[2].completion == [{"role": "assistant", "content": "a"}]


def test_preference_explicit_and_extras(jsonl):
    data = load_preferences(jsonl([{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 2, "annotator": 7},
                                   {"prompt": "p", "chosen": "x", "rejected": "y", "label": "tie"}]))
    first = data.pairs[0]
    assert (first.prompt, first.chosen, first.rejected, first.margin) == ("p", "good", "bad", 2)
    assert first.extra == {"annotator": 7}
    assert data.ties == 1


def test_anthropic_hh_split_and_identical_pairs_dropped(jsonl):
    data = load_preferences(jsonl([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                   {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},
                                   {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]))
    assert len(data.pairs) == 2 and data.dropped_identical == 1 and data.duplicates == 1
    pair = data.pairs[0]
    assert pair.prompt == "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" Why did the cat sit?", " No.")
    assert pair.prompt + pair.chosen == HH_CHOSEN


def test_split_transcripts_diverging_early():
    chosen = "\n\nHuman: a\n\nAssistant: yes\n\nHuman: b\n\nAssistant: c"
    rejected = "\n\nHuman: a\n\nAssistant: no"
    prompt, c, r = split_transcripts(chosen, rejected)
    assert prompt == "\n\nHuman: a\n\nAssistant:" and c == " yes\n\nHuman: b\n\nAssistant: c" and r == " no"


def test_conversational_preference_implicit_prompt(jsonl):
    user = {"role": "user", "content": "hi"}
    data = load_preferences(jsonl([{"chosen": [user, {"role": "assistant", "content": "hello"}],
                                    "rejected": [user, {"role": "assistant", "content": "go away"}]}]))
    pair = data.pairs[0]
    assert pair.prompt == [user]
    assert pair.chosen == [{"role": "assistant", "content": "hello"}]


def test_real_hh_file_loads_as_is(shared):
    path = shared("anthropic-hh-rlhf", "helpful-base-test.jsonl.gz")
    data = load_preferences(str(path))
    assert data.read == 2354 and data.dropped_identical == 2  # PROVENANCE.md: 2 identical pairs upstream
    assert len(data.pairs) == data.read - data.dropped_identical - data.dropped_empty
    assert all(p.prompt.endswith("\n\nAssistant:") for p in data.pairs)


def test_ratings_and_edits(jsonl):
    ratings = load_ratings(jsonl([{"prompt": "p", "completion": "c", "score": 5}]))
    assert ratings[0].score == 5.0
    edits = load_edits(jsonl([{"prompt": "p", "completion": "old", "edited": "new"}]))
    pairs = edits_to_preferences(edits)
    assert (pairs[0].chosen, pairs[0].rejected) == ("new", "old")


def test_gzip_and_json_array_and_dataset(tmp_path):
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "zipped"}) + "\n")
    assert load_prompts(gz)[0].prompt == "zipped"
    arr = tmp_path / "p.json"
    arr.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert [p.prompt for p in load_prompts(arr)] == ["a", "b"]
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert load_preferences(ds).pairs[0].chosen == "c"


def test_text_csv_and_tsv_files(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("Once upon a time\n\n  The cat sat  \r\nA \"quoted\" line\n")
    assert [p.prompt for p in load_prompts(txt)] == ["Once upon a time", "  The cat sat", 'A "quoted" line']
    assert load_prompts(txt)[1].where.endswith("prompts.txt:3")
    assert [e.completion for e in load_sft(txt)][0] == "Once upon a time"  # a .txt line is {"text": line}
    with gzip.open(tmp_path / "p.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("zipped line\n")
    assert load_prompts(tmp_path / "p.txt.gz")[0].prompt == "zipped line"
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('prompt,reference\n"Hello, world",ref one\n\n"two\nlines",r2\n')
    prompts = load_prompts(csv_path)
    assert [p.prompt for p in prompts] == ["Hello, world", "two\nlines"]
    assert prompts[0].extra == {"reference": "ref one"}
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("prompt\tchosen\trejected\nQ:\t yes\t no\n")
    assert load_preferences(tsv).pairs[0].rejected == " no"
    (tmp_path / "q.jsonl").write_text(json.dumps({"query": "TRL's old name"}) + "\n")
    assert load_prompts(tmp_path / "q.jsonl")[0].prompt == "TRL's old name"
    for name, content, message in [("e.txt", "\n  \n", "e.txt: empty file"),
                                   ("short.csv", "prompt,ref\na,b\nc\n", "short.csv:3: 1 columns, the header has 2"),
                                   ("h.csv", "prompt\n", "h.csv: no records after the header row"),
                                   ("none.csv", "text\nx\n", None)]:
        (tmp_path / name).write_text(content)
        if message is None:
            assert load_prompts(tmp_path / name)[0].prompt == "x"
            continue
        with pytest.raises(UserError, match=message):
            load_prompts(tmp_path / name)
    (tmp_path / "other.csv").write_text("question\nx\n")
    with pytest.raises(UserError, match="other.csv:2: missing field 'prompt'"):
        load_prompts(tmp_path / "other.csv")


def test_csv_numeric_fields_read_as_numbers(tmp_path):
    """CSV/TSV cells are strings; the fields that hold numbers (score, margin) read them as numbers, a blank
    optional cell counts as absent, and a cell that is not a finite number is refused naming file, line and field."""
    ratings = tmp_path / "r.csv"
    ratings.write_text("prompt,completion,score,note\nQ,A, 4 ,7\nQ,B,-0.5,x\nQ,C,1e-3,\n")
    got = load_ratings(ratings)
    assert [r.score for r in got] == [4.0, -0.5, 0.001]
    assert got[0].extra == {"note": "7"}  # other fields stay as written
    pairs = tmp_path / "p.tsv"
    pairs.write_text("prompt\tchosen\trejected\tmargin\tlabel\nQ\ty\tn\t2.5\ttie\nQ\ty\tn\t\t\n")
    first, second = load_preferences(pairs).pairs
    assert (first.margin, first.label) == (2.5, "tie")
    assert (second.margin, second.label) == (None, "chosen")
    for name, content, message in [
            ("s.csv", "prompt,completion,score\nQ,A,4\nQ,B,good\n", "s.csv:3: field 'score': expected a finite "
             "number, got 'good'"),
            ("n.csv", "prompt,completion,score\nQ,A,nan\n", "n.csv:2: field 'score': expected a finite number"),
            ("b.csv", "prompt,completion,score\nQ,A,\n", "b.csv:2: field 'score': empty cell, expected a number"),
            ("m.csv", "prompt,chosen,rejected,margin\nQ,y,n,-1\n", "m.csv:2: field 'margin': expected a finite "
             "number >= 0")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(UserError, match=re.escape(message)):
            (load_ratings if "score" in content else load_preferences)(tmp_path / name)
    # JSON keeps its types: a quoted number there is a type error, as before
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "Q", "completion": "A", "score": "4"}) + "\n")
    with pytest.raises(UserError, match="q.jsonl:1: field 'score': expected a finite number, got '4'"):
        load_ratings(tmp_path / "q.jsonl")


def test_write_jsonl_refuses_names_read_as_another_format(tmp_path):
    from rlhfkit.data import write_jsonl

    for name in ("a.csv", "a.tsv", "a.txt", "a.json", "a.csv.gz"):
        with pytest.raises(UserError, match="would be read back as"):
            write_jsonl(tmp_path / name, [{"x": 1}])
        assert not (tmp_path / name).exists()
    for name in ("a.jsonl", "a.jsonl.gz", "a.out"):  # read back as JSON Lines
        write_jsonl(tmp_path / name, [{"x": 1}])
        assert [r.data for r in read_records(tmp_path / name)] == [{"x": 1}]


def test_bundled_paths():
    assert len(load_prompts("bundled:tinystories_eval_prompts.jsonl")) == 200
    with pytest.raises(UserError, match="no such bundled file"):
        read_records("bundled:nope.jsonl")


# --- bad input: one case per kind, the message names file, line and field -------------------------------------

def _bad(tmp_path, content: bytes, loader=load_sft):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        loader(path)
    return str(err.value)


def test_malformed_json(tmp_path):
    msg = _bad(tmp_path, b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')
    assert "bad.jsonl:2: malformed JSON" in msg


def test_missing_field(tmp_path):
    msg = _bad(tmp_path, b'{"completion": "b"}\n')
    assert "bad.jsonl:1: missing field 'prompt'" in msg


def test_misspelt_field(tmp_path):
    msg = _bad(tmp_path, b'{"promt": "a", "chosen": "c", "rejected": "r"}\n', load_preferences)
    assert "bad.jsonl:1" in msg and "promt" in msg
    msg = _bad(tmp_path, b'{"prompt": "a", "completoin": "b"}\n')
    assert "missing field 'completion' (found 'completoin': misspelt?)" in msg


def test_wrong_type(tmp_path):
    msg = _bad(tmp_path, b'{"prompt": 3, "completion": "b"}\n')
    assert "bad.jsonl:1: field 'prompt': expected a string, got int" in msg
    msg = _bad(tmp_path, b'{"prompt": "p", "completion": "c", "score": "high"}\n', load_ratings)
    assert "field 'score': expected a finite number" in msg
    msg = _bad(tmp_path, b'{"messages": [{"role": "bot", "content": "x"}]}\n')
    assert "field 'messages[0].role'" in msg


def test_empty_text(tmp_path):
    msg = _bad(tmp_path, b'{"prompt": "a", "completion": "b"}\n{"prompt": "  ", "completion": "b"}\n')
    assert "bad.jsonl:2: field 'prompt': empty text" in msg
    msg = _bad(tmp_path, b'{"prompt": "p", "chosen": "", "rejected": "r"}\n', load_preferences)
    assert "field 'chosen': empty text" in msg


def test_non_utf8(tmp_path):
    msg = _bad(tmp_path, b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    assert "bad.jsonl:2: not valid UTF-8 (byte 0xe9" in msg


def test_empty_file(tmp_path):
    assert "bad.jsonl: empty file" in _bad(tmp_path, b"")
    assert "bad.jsonl: empty file" in _bad(tmp_path, b"\n\n")


def test_not_an_object_and_missing_file(tmp_path):
    assert "bad.jsonl:1: expected a JSON object, got list" in _bad(tmp_path, b"[1, 2]\n")
    with pytest.raises(UserError, match="file not found"):
        load_sft(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        load_sft(tmp_path)


def test_nan_scores_and_negative_margin(tmp_path):
    assert "field 'score'" in _bad(tmp_path, b'{"prompt": "p", "completion": "c", "score": NaN}\n', load_ratings)
    msg = _bad(tmp_path, b'{"prompt": "p", "chosen": "c", "rejected": "r", "margin": -1}\n', load_preferences)
    assert "field 'margin'" in msg


def test_huge_line_rejected(tmp_path, monkeypatch):
    import rlhfkit.data.io as io

    monkeypatch.setattr(io, "MAX_LINE_BYTES", 64)
    msg = _bad(tmp_path, b'{"prompt": "' + b"a" * 200 + b'", "completion": "b"}\n')
    assert "bad.jsonl:1: line longer than" in msg


def test_all_identical_pairs_is_an_error(jsonl):
    with pytest.raises(UserError, match="no usable preference pairs"):
        load_preferences(jsonl([{"prompt": "p", "chosen": "same", "rejected": "same"}]))
