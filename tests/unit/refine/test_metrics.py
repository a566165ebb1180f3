"""prox_eval's metrics against counts worked out by hand on small fixed cases."""

import json

import pytest

from megatron_slm.refine.evaluate import Example, score
from megatron_slm.refine.metrics import chunk_line_numbers, prf, removed_lines

CHUNK_A = "[doc]\n[010]alpha\n[011]beta\n[012]gamma\n[013]delta\n[/doc]"
CHUNK_B = "[doc]\n[000]one\n[001]two\n[002]three\n[/doc]"


def test_chunk_lines_are_the_numbered_ones():
    assert chunk_line_numbers(CHUNK_A) == [10, 11, 12, 13]
    # a range reaching past the chunk counts only the chunk's own lines
    assert removed_lines("remove_lines(line_start=12, line_end=40)", [10, 11, 12, 13]) == {12, 13}
    assert removed_lines("remove_lines(0, 10)\nkeep_chunk()", [10, 11]) == {10}


def test_document_drop_f1_by_hand():
    # (model, reference): tp, fp, fn, tn, tp, and an unparsable answer (= keep) on a drop -> fn
    pairs = [
        ("drop_doc()", "drop_doc()"),
        ("drop_doc()", "keep_doc()"),
        ("keep_doc()", "drop_doc()"),
        ("keep_doc()", "keep_doc()"),
        ("drop_doc()", "drop_doc()"),
        ("throw_away()", "drop_doc()"),
    ]
    report = score([Example("doc", "text", ref) for _, ref in pairs], [p for p, _ in pairs])
    d = report["doc_drop"]
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (2, 1, 2, 1)
    assert d["precision"] == pytest.approx(2 / 3)
    assert d["recall"] == pytest.approx(2 / 4)
    assert d["f1"] == pytest.approx(4 / 7)  # 2 * (2/3 * 1/2) / (2/3 + 1/2)
    assert d["accuracy"] == pytest.approx(3 / 6)
    assert report["program_error_rate"] == pytest.approx(1 / 6)
    assert "chunk_lines" not in report


def test_chunk_line_f1_and_normalize_match_by_hand():
    examples = [
        # model removes 10-11, reference 11-12: tp {11}, fp {10}, fn {12}
        Example("chunk", CHUNK_A, "remove_lines(line_start=11, line_end=12)"),
        # model removes 1..5 (1, 2 in the chunk), reference keeps: fp {1, 2}; same normalize
        Example("chunk", CHUNK_B, 'keep_chunk()\nnormalize(source_str="x", target_str="y")'),
        # model writes garbage (an error, removes nothing); reference normalizes differently
        Example("chunk", CHUNK_B, 'normalize(source_str="one", target_str="1")'),
        # both keep: nothing counted, no normalize compared
        Example("chunk", CHUNK_A, "keep_chunk()"),
    ]
    predictions = [
        "remove_lines(line_start=10, line_end=11)",
        'remove_lines(line_start=1, line_end=5)\nnormalize(source_str="x", target_str="y")',
        "remove lines 0 to 1",
        "keep_chunk()",
    ]
    report = score(examples, predictions)
    c = report["chunk_lines"]
    assert (c["tp"], c["fp"], c["fn"]) == (1, 3, 1)
    assert c["precision"] == pytest.approx(1 / 4)
    assert c["recall"] == pytest.approx(1 / 2)
    assert c["f1"] == pytest.approx(1 / 3)  # 2 * (1/4 * 1/2) / (1/4 + 1/2)
    assert report["normalize_compared"] == 2
    assert report["normalize_exact_match"] == pytest.approx(1 / 2)
    assert report["program_error_rate"] == pytest.approx(1 / 4)
    assert report["program_error_rate_by_stage"] == {"doc": None, "chunk": pytest.approx(1 / 4)}


def test_empty_classes_give_zero_not_a_division_error():
    assert prf(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}


def test_heldout_file_errors_name_the_line(tmp_path):
    from megatron_slm.refine.evaluate import EvalError, read_examples

    path = tmp_path / "heldout.jsonl"
    good = {"messages": [{"role": "user", "content": "[doc]\n[000]a\n[/doc]"},
                         {"role": "assistant", "content": "keep_chunk()"}]}  # fmt: skip
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": good["messages"][:1]}) + "\n")
    with pytest.raises(EvalError, match=f"{path}:2: .*last \\(assistant\\) message"):
        read_examples(str(path))
    path.write_text(json.dumps(good) + "\n")
    assert [(e.stage, e.reference) for e in read_examples(str(path))] == [("chunk", "keep_chunk()")]
    with pytest.raises(EvalError, match="--data .*: no such file"):
        read_examples(str(tmp_path / "missing.jsonl"))
