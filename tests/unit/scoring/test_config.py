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
