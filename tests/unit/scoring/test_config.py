"""score_corpus's flags: the trainer's --data-path blend names the datasets --data-prefix names."""

from megatron_slm.cli import build_parser, parse_configs
from megatron_slm.scoring import ScoreConfig

GROUPS = {"s": ScoreConfig}


def _parse(argv):
    return parse_configs(build_parser("score_corpus", None, GROUPS), GROUPS, argv)["s"]


def test_data_path_blend_and_data_prefix_parse_alike():
    blend = _parse(["--load", "ckpt", "--data-path", "0.7", "data/web", "0.3", "data/code"])
    prefixes = _parse(["--load", "ckpt", "--data-prefix", "data/web", "data/code"])
    assert blend.data_prefix == prefixes.data_prefix == ["data/web", "data/code"]


def test_packed_rows_refuse_a_spec_that_ignores_their_mask(capsys):
    """Rows packing several documents need the torch spec (Transformer Engine and megatron-core's
    fused causal softmax ignore a given mask): another one is a flag error (exit 2) naming why;
    one document per row takes any spec."""
    import pytest

    base = ["--load", "ckpt", "--data-prefix", "d"]
    for argv, flag in (
        (["--packing", "rows", "--transformer-impl", "local"], "--packing rows"),
        (["--pipeline-model-parallel-size", "2", "--transformer-impl", "te"], "--packing auto"),
    ):
        with pytest.raises(SystemExit) as exit_:
            _parse(base + argv)
        assert exit_.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag in line and line.endswith("use --transformer-impl torch"), line
    assert _parse(base + ["--packing", "rows"]).documents_flag == "--packing rows"
    assert _parse(base + ["--packing", "rows", "--transformer-impl", "torch"]).spec_impl == "torch"
    sorted_rows = _parse(base + ["--transformer-impl", "local"])  # auto at PP 1: length-sorted
    assert sorted_rows.documents_flag is None and sorted_rows.spec_impl == "local"
