"""Segmenting documents for perplexity (no model)."""

from megatron_slm.evaluation import segments


def test_segments_cover_every_token_once():
    doc = list(range(10))
    segs = list(segments(doc, 4))
    assert segs == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    predicted = [t for s in segs for t in s[1:]]
    assert predicted == doc[1:]
    assert list(segments([5], 4)) == []
