"""SLM GPT dataset: exhaustive alignment of ``ref_loss`` with the labels over every sample of
multi-document, multi-epoch, shuffled, blended datasets, plus the sidecar policy errors.

Tokens encode their own (dataset, document, position): ``token = 1 + base + 100 * doc + pos``,
and the sidecar value at (doc, pos) is ``float(token)`` (NaN at pos 0). So the expected
``ref_loss[j]`` follows from ``labels[j]`` alone (an independent reference): NaN for padding
(loss_mask 0) or a first-of-document label, else ``float(labels[j])``.
"""

import json
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_slm.data import SidecarError, build_gpt_datasets, build_tokenizer, sidecar_prefix
from megatron_slm.data.gpt_dataset import _single_process_rank
from megatron_slm.errors import ConfigError
from tests.unit.data import write_sidecar, write_token_dataset

VOCAB = 1 << 17
BASES = {"A": 0, "B": 20000}


def _docs(seed, n):
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 3, 17, 16, 15] + list(rng.integers(1, 80, size=n - 6))
    return [[int(i) for i in np.arange(n_) + 1 + 100 * d] for d, n_ in enumerate(lengths)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    prefixes = {}
    for name, base in BASES.items():
        docs = [[t + base for t in doc] for doc in _docs(len(prefixes), 50 if name == "A" else 30)]
        prefix = write_token_dataset(str(root / name), docs, vocab_size=VOCAB)
        fn = lambda d, p, base=base: np.where(p == 0, np.nan, 1 + base + 100 * d + p)
        write_sidecar(prefix, fn, dtype="float32")
        prefixes[name] = prefix
    return root, prefixes


def _expected_ref(sample):
    labels = sample["labels"].numpy()
    pos = (labels - 1) % 100
    exp = np.where(pos == 0, np.nan, labels.astype(np.float32))
    return np.where(sample["loss_mask"].numpy() == 0, np.nan, exp).astype(np.float32)


def _plain_gpt(prefixes, weights, split, seq, seed, sizes, tok, cache, **kw):
    """megatron-core's own GPTDataset on the same config (for token-level equality)."""
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq, blend=(prefixes, weights), split=split,
        path_to_cache=cache, tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, **kw,
    )  # fmt: skip
    with _single_process_rank():  # megatron-core's BlendedDataset needs a rank
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()


def _check_all(datasets, plain):
    n_checked, n_nan_label, n_pad = 0, 0, 0
    for ds, ref in zip(datasets, plain):
        if ds is None:
            assert ref is None
            continue
        assert len(ds) == len(ref)
        for i in range(len(ds)):
            s, r = ds[i], ref[i]
            assert set(s) == set(r) | {"ref_loss"}
            for k in r:
                assert torch.equal(torch.as_tensor(s[k]), torch.as_tensor(r[k])), (i, k)
            got = s["ref_loss"]
            assert got.dtype == torch.float32 and got.shape == s["labels"].shape
            np.testing.assert_array_equal(got.numpy(), _expected_ref(s), err_msg=f"sample {i}")
            if "dataset_id" in s:  # blended: the label tokens come from the reported dataset
                base = list(BASES.values())[int(s["dataset_id"])]
                valid = s["loss_mask"].numpy() > 0
                labels = s["labels"].numpy()[valid] - 1
                assert np.all((labels >= base) & (labels < base + 20000))
            n_checked += 1
            n_nan_label += int(torch.isnan(got).sum())
            n_pad += int((s["loss_mask"] == 0).sum())
    return n_checked, n_nan_label, n_pad


@pytest.mark.parametrize("extra_token", [True, False])
def test_alignment_single_dataset_multi_epoch(corpus, tmp_path, extra_token):
    root, prefixes = corpus
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1)
    kw = dict(add_extra_token_to_sequence=extra_token, drop_last_partial_validation_sequence=False)
    # ~1800 tokens, 80% train: 2.3 epochs (separate final epoch), valid/test one padded epoch
    args = ([prefixes["A"]], "80,15,5", 16, 7, [200, None, None], tok)
    ours = build_gpt_datasets(*args, data_cache_path=str(tmp_path / "c1"),
                              require_sidecar=True, **kw)  # fmt: skip
    plain = _plain_gpt([prefixes["A"]], None, "80,15,5", 16, 7, [200, None, None], tok,
                       str(tmp_path / "c2"), **kw)  # fmt: skip
    n, n_nan, n_pad = _check_all(ours, plain)
    assert n >= 200 + 10 and n_nan > n // 3  # many samples span documents
    assert n_pad > 0  # the last valid/test sample is padded
    train = ours[0]
    assert len(train) >= 200 and len(train.document_index) > 2 * 40  # multiple epochs
    # the batch-padding sample
    pad_sample = train[None]
    assert torch.isnan(pad_sample["ref_loss"]).all() and pad_sample["loss_mask"].sum() == 0


@pytest.mark.parametrize("threads", [1, 3])
def test_alignment_blended(corpus, tmp_path, monkeypatch, threads):
    """Also with --num-dataset-builder-threads (megatron-core builds the blend's datasets in a
    pool of that many threads): the same samples as megatron-core's serial build."""
    from megatron.core.datasets import blended_megatron_dataset_builder as builder

    pools = []

    class CountedPool(builder.ThreadPoolExecutor):
        def __init__(self, max_workers):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers)

    monkeypatch.setattr(builder, "ThreadPoolExecutor", CountedPool)
    root, prefixes = corpus
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1)
    blend = ["0.7", prefixes["A"], "0.3", prefixes["B"]]
    sizes = [300, 40, 20]
    ours = build_gpt_datasets(blend, "90,8,2", 24, 11, sizes, tok, str(tmp_path / "c1"),
                              num_dataset_builder_threads=threads)  # fmt: skip
    assert pools and set(pools) == {threads}
    pools.clear()
    plain = _plain_gpt([prefixes["A"], prefixes["B"]], [0.7, 0.3], "90,8,2", 24, 11, sizes, tok,
                       str(tmp_path / "c2"))  # fmt: skip
    n, _, _ = _check_all(ours, plain)
    assert n == sum(len(d) for d in ours) >= 300
    ids = {int(ours[0][i]["dataset_id"]) for i in range(len(ours[0]))}
    assert ids == {0, 1}


def test_sidecar_policy(corpus, tmp_path):
    root, prefixes = corpus
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1)
    plain = write_token_dataset(str(tmp_path / "nosc"), _docs(5, 20), vocab_size=VOCAB)
    # without a sidecar: fine for plain training, ref_loss all NaN
    train, _, _ = build_gpt_datasets([plain], "1,0,0", 16, 1, [10, 0, 0], tok, str(tmp_path / "c"))
    assert torch.isnan(train[0]["ref_loss"]).all()
    # selective training: an error naming the prefix
    with pytest.raises(SidecarError, match=f"prefix '{plain}'"):
        build_gpt_datasets(["0.5", prefixes["A"], "0.5", plain], "1,0,0", 16, 1, [10, 0, 0], tok,
                           str(tmp_path / "c"), require_sidecar=True)  # fmt: skip
    # a mismatched sidecar is an error before any index is built, required or not
    meta_path = sidecar_prefix(plain) + ".json"
    meta = json.load(open(sidecar_prefix(prefixes["B"]) + ".json"))
    with open(sidecar_prefix(plain) + ".bin", "wb") as f:
        f.write(b"\0" * 4 * meta["num_tokens"])
    json.dump(meta, open(meta_path, "w"))
    cache = str(tmp_path / "c_mismatch")
    with pytest.raises(SidecarError) as e:
        build_gpt_datasets([plain], "1,0,0", 16, 1, [10, 0, 0], tok, cache)
    assert sidecar_prefix(plain) + ".bin" in str(e.value) and plain + ".idx" in str(e.value)
    assert not os.path.exists(cache)


@pytest.mark.parametrize(
    "split, empty",
    [("969,30,1", "test"), ("99,1,0", "validation"), ("0.5,99.5,0", "training"), ("96,4,0", None),
     ("100,0,0", None)],
)  # fmt: skip
def test_a_split_that_holds_no_sequence_is_refused(corpus, tmp_path, split, empty):
    """megatron-core draws a split's samples epoch after epoch until it has enough: from a split
    that holds no sequence it would loop forever. A (30 sequences): 0.1% and 1% of it round to
    none, 4% to one. Refused in one line before any index is built."""
    _, prefixes = corpus
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1)
    build = lambda: build_gpt_datasets(  # noqa: E731
        [prefixes["B"]], split, 16, 1, [8, 8, 8], tok, data_cache_path=str(tmp_path)
    )
    if empty is None:
        assert len(build()[0]) >= 8  # (whole epochs)
        return
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(
        f"--split {split}: the {empty} split of {prefixes['B']} holds none of its 30 sequences"
    )
