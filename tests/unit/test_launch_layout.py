"""``launch.initialize_for``: a job's config names its layout once (``runtime.LoadArgs`` and the
configs built on it); the launcher reads the fields the config has and keeps the defaults of the
ones it lacks. (Every tool test runs the real initialisation through it.)"""

from types import SimpleNamespace

from megatron_slm import launch
from megatron_slm.scoring import ScoreConfig
from megatron_slm.tinylm.compact_config import RemapConfig


def test_the_layout_comes_from_the_config(monkeypatch):
    monkeypatch.setattr(launch, "initialize", lambda **kw: kw)
    score = ScoreConfig(load="ckpt", data_prefix=["d"], device="cpu", seed=7,
                        tensor_model_parallel_size=2, pipeline_model_parallel_size=3)  # fmt: skip
    assert launch.initialize_for(score) == {
        "device": "cpu",
        "tensor_model_parallel_size": 2,
        "pipeline_model_parallel_size": 3,
        "seed": 7,
    }
    remap = RemapConfig(load="ckpt", id_map="m.json", save="out", pipeline_model_parallel_size=2)
    assert launch.initialize_for(remap) == {  # no seed field: initialize's default stays
        "device": "auto",
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 2,
    }
    assert launch.initialize_for(SimpleNamespace(device="cuda"), device="cpu") == {"device": "cpu"}
