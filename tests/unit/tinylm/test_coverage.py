"""Choosing the compact vocabulary size by coverage.

``Ranking.select`` equals a plain first-fit selection (written out below) at every N;
``smallest_size`` is the brute-force minimum (coverage is not monotone in N, so a bisection
would not do); the coverage curve's rows are what ``prune`` produces at those N (coverage, and
tokens per byte of the model file it writes); ``count`` prints the table and writes the JSON and
the PNG, and ``prune --coverage C`` keeps the N the curve shows for C.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm_lib

from megatron_slm.data.indexed import DocumentBuilder
from megatron_slm.tinylm import spm
from megatron_slm.tinylm.coverage import coverage_curve, curve_png, curve_table
from megatron_slm.tinylm.prune import Ranking, bpe_closures, mandatory_ids, prune_model, write_model
from megatron_slm.tinylm.spm import TokenizerModelError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def reference_select(proto, counts, n):
    """First fit in frequency order, each candidate with the pieces of its closure not yet
    kept, pass after pass while the budget lasts; then unreachable pieces fill what is left.
    Returns (kept, kept for a closure), both sorted."""
    kept = set(mandatory_ids(proto))
    normal = [i for i, p in enumerate(proto.pieces) if p.type == spm.NORMAL]
    unreachable = set(spm.unreachable_pieces(proto, normal))
    order = sorted((i for i in normal if i not in unreachable), key=lambda i: (-counts[i], i))
    closures = bpe_closures(proto, order) if spm.model_type(proto) == "bpe" else {}
    by_closure, budget, todo = set(), n - len(kept), order
    while budget > 0 and todo:
        skipped = []
        for i in todo:
            if i in kept:
                continue
            new = [j for j in dict.fromkeys(closures.get(i, [i])) if j not in kept]
            new += [] if i in new else [i]
            if len(new) > budget:
                skipped.append(i)
                continue
            kept.update(new)
            by_closure.update(j for j in new if j != i)
            budget -= len(new)
            if budget == 0:
                break
        if len(skipped) == len(todo):
            break
        todo = skipped
    for i in sorted(unreachable) + [i for i in order if i not in kept]:
        if budget > 0 and i not in kept:
            kept.add(i)
            budget -= 1
    return sorted(kept), sorted(by_closure)


def _long_piece_counts(proto):
    """Counts on long pieces only: many candidates need their (uncounted) intermediates."""
    lengths = np.array([len(p.piece) if p.type == spm.NORMAL else 0 for p in proto.pieces])
    return np.where(lengths >= 5, 1000 + lengths, lengths).astype(np.int64)


CASES = [("bpe", "counted"), ("bpe", "long pieces"), ("unigram", "counted")]


def _case(models, kind, counts_name):
    proto = spm.load_model_proto(models[kind]["model"])
    counts = models[kind]["counts"] if counts_name == "counted" else _long_piece_counts(proto)
    return proto, counts


@pytest.mark.parametrize("kind,counts_name", CASES)
def test_selection_at_every_size_is_first_fit(models, kind, counts_name):
    proto, counts = _case(models, kind, counts_name)
    r = Ranking(proto, counts)
    m = len(r.mandatory)
    sizes = sorted(set(range(m, r.selectable + 1, 3)) | {m, m + 1, r.selectable})
    for n in sizes:
        sel = r.select(n)
        kept, by_closure = reference_select(proto, counts, n)
        assert (sel.kept, sel.by_closure) == (kept, by_closure), n
        assert r.coverage(n) == counts[kept].sum() / counts.sum(), n  # integer counts: exact


@pytest.mark.parametrize("kind,counts_name", CASES)
def test_smallest_size_is_the_brute_force_minimum(models, kind, counts_name):
    proto, counts = _case(models, kind, counts_name)
    r = Ranking(proto, counts)
    m = len(r.mandatory)
    sizes = range(m, r.selectable + 1)
    covered = [r.coverage(n) for n in sizes]
    if (kind, counts_name) == ("bpe", "counted"):
        # A larger budget can fit a closure of rare pieces instead of frequent later pieces.
        assert any(b < a for a, b in zip(covered, covered[1:]))
    for target in (0.3, 0.9, 0.99, 0.995, 0.999, 1.0):
        n = r.smallest_size(target)
        assert n == next(s for s, c in zip(sizes, covered) if c >= target), target
        kept, _ = reference_select(proto, counts, n)
        assert counts[kept].sum() / counts.sum() >= target
        if n > m:
            below, _ = reference_select(proto, counts, n - 1)
            assert counts[below].sum() / counts.sum() < target


def test_smallest_size_errors(models):
    proto = spm.load_model_proto(models["bpe"]["model"])
    with pytest.raises(TokenizerModelError, match="--coverage 0.9: the counts hold no tokens"):
        Ranking(proto, np.zeros(len(proto.pieces), dtype=np.int64)).smallest_size(0.9)
    # Counted tokens on a piece no pruned model keeps (UNUSED): 100% is out of reach.
    counts = models["bpe"]["counts"]
    i = int(np.argmax(np.where([p.type == spm.NORMAL for p in proto.pieces], counts, -1)))
    proto.pieces[i].type = spm.UNUSED
    with pytest.raises(TokenizerModelError, match=r"--coverage 1.0: even all 999 selectable"):
        Ranking(proto, counts).smallest_size(1.0)


def test_curve_rows_are_what_prune_writes(models, tmp_path):
    import matplotlib.image

    proto, counts = _case(models, "bpe", "counted")
    heldout = models["bpe"]["heldout"]
    curve = coverage_curve(proto, counts, [300, 450, 600], [0.9, 0.995], heldout)
    r = Ranking(proto, counts)
    chosen = {0.9: r.smallest_size(0.9), 0.995: r.smallest_size(0.995)}
    assert curve["targets"] == {"0.9": chosen[0.9], "0.995": chosen[0.995]}
    assert [row["vocab_size"] for row in curve["rows"]] == sorted({300, 450, 600, *chosen.values()})
    n_bytes = sum(len(t.encode("utf-8")) for t in heldout)
    big = models["bpe"]["sp"]
    assert curve["heldout"]["original"]["tokens"] == sum(len(x) for x in big.encode(heldout))
    for row in curve["rows"]:
        n = row["vocab_size"]
        kept, _ = reference_select(proto, counts, n)
        assert row["coverage"] == counts[kept].sum() / counts.sum()
        path = str(tmp_path / f"s{n}.model")
        write_model(prune_model(proto, counts, n).proto, path)
        small = spm_lib.SentencePieceProcessor(model_file=path)
        tokens = sum(len(x) for x in small.encode(heldout))
        assert (row["tokens"], row["tokens_per_byte"]) == (tokens, tokens / n_bytes)
        assert row["targets"] == [t for t, c in chosen.items() if c == n]
    table = curve_table(curve).splitlines()
    assert len(table) == 2 + len(curve["rows"]) and "tokens/byte" in table[1]
    marked = [ln for ln in table if "<- smallest N with coverage >= 0.995" in ln]
    assert len(marked) == 1 and marked[0].split()[0] == str(chosen[0.995])
    assert "(prune --coverage 0.995)" in marked[0]
    image = matplotlib.image.imread(io.BytesIO(curve_png(curve, "t")), format="png")
    assert image.shape[:2] == (480, 800)
    # Without held-out text: coverage only.
    bare = coverage_curve(proto, counts, [300], [0.995], None)
    assert "tokens" not in bare["rows"][0] and "heldout" not in bare
    assert "tokens/byte" not in curve_table(bare)
    assert matplotlib.image.imread(io.BytesIO(curve_png(bare, "t")), format="png").ndim == 3


def _tool():
    spec = importlib.util.spec_from_file_location(
        "compact_tokenizer", os.path.join(REPO, "tools", "compact_tokenizer.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_prints_the_curve_and_prune_keeps_its_n(models, tmp_path, capsys):
    bpe = models["bpe"]
    docs = bpe["sp"].encode([json.loads(line)["text"] for line in open(os.path.join(
        REPO, "examples", "sample_data", "clean.jsonl"))][:-20])  # fmt: skip
    b = DocumentBuilder(str(tmp_path / "data"), np.uint16)
    b.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    prefix = b.finalize()
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in bpe["heldout"]))
    tool, counts = _tool(), str(tmp_path / "counts.npy")
    argv = ["count", "--data-path", prefix, "--tokenizer-model", bpe["model"], "--output", counts]
    assert tool.main([*argv, "--heldout", str(heldout), "--curve-sizes", "300", "600"]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "counts.coverage.json") as f:
        curve = json.load(f)
    assert curve_table(curve) in out and "counts.coverage.png" in out
    assert os.path.getsize(tmp_path / "counts.coverage.png") > 1000
    assert set(curve["targets"]) == {"0.99", "0.995", "0.999"}
    assert curve["heldout"]["documents"] == 20 and curve["counted_tokens"] == bpe["counts"].sum()
    small = str(tmp_path / "small.model")
    prune = ["prune", "--tokenizer-model", bpe["model"], "--counts", counts, "--output", small]
    assert tool.main([*prune, "--coverage", "0.995"]) == 0
    assert f"--coverage 0.995: N = {curve['targets']['0.995']}," in capsys.readouterr().out
    with open(tmp_path / "small.report.json") as f:
        report = json.load(f)
    assert report["pieces"]["after"] == curve["targets"]["0.995"]
    assert report["coverage_target"] == 0.995 and report["coverage"] >= 0.995
    # A size no pruned model has: refused before the corpus is read (no counts written).
    other = str(tmp_path / "other.npy")
    bad = [*argv[:-1], other, "--curve-sizes", "100"]
    assert tool.main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--curve-sizes 100: a pruned" in err and "has 260..1000 pieces" in err
    assert not os.path.exists(other)
    # A tokenizer that cannot be pruned has counts and no curve.
    null = ["count", "--data-path", prefix, "--tokenizer-type", "NullTokenizer"]
    assert tool.main([*null, "--vocab-size", "1000", "--output", other]) == 0
    assert "no coverage curve: a NullTokenizer cannot be pruned" in capsys.readouterr().out
    assert os.path.exists(other) and not os.path.exists(tmp_path / "other.coverage.png")
