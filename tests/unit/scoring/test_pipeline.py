"""The scorer's pipeline (megatron_slm/scoring/pipeline.py) with a tiny model in real processes:

- zero host syncs on the main thread over several rounds of scorer batches (after two warm-up
  rounds; the first one flushed, as ``--dry-run`` does, and counted when the flush returns),
  every forward in inference mode, the values equal to a plain one-document-at-a-time forward
  with sliding windows; its GPU twin (``tests/gpu/test_scoring_sync_free.py``) runs the
  same rounds under ``torch.cuda.set_sync_debug_mode("error")``;
- a host-worker failure on one rank ends every rank (its own error there, a ScoringError on the
  others), none waits forever in the round collective;
- the prefetcher hands its items over in order and re-raises its exception on the main thread.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.dist_helpers import run_distributed

SEQ, STRIDE, MBS, DOCS_PER_CHUNK, ROUNDS = 32, 24, 2, 6, 6


def _documents(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 40, size=n)
    lengths[::7] = 1  # nothing to predict
    lengths[3::9] = 75  # three windows
    return [rng.integers(0, 500, size=int(k)).astype(np.int64) for k in lengths]


def _tiny_lm(seed: int, device: str = "cpu"):
    import torch

    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.runtime import LoadedModel

    dev = launch.initialize(device=device, seed=seed)
    cfg = get_preset("tiny")
    (model,) = build_model(cfg, ModelBuildOptions(transformer_impl="torch"), dev)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel([model], cfg, None, model.vocab_size, dev, torch.float32, "in memory")


def _chunks(docs: list[np.ndarray], pin: bool = False):
    from megatron_slm.scoring.chunks import ChunkLayout, prepare_chunk

    tokens = np.concatenate(docs)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    layout = ChunkLayout(SEQ, STRIDE, MBS, "length-sorted", 1, pin=pin)
    return [
        prepare_chunk(tokens, offsets, a, min(a + DOCS_PER_CHUNK, len(docs)), layout)
        for a in range(0, len(docs), DOCS_PER_CHUNK)
    ]


def _plain_losses(model, doc: np.ndarray) -> np.ndarray:
    """The reference: windows of SEQ inputs at 0, STRIDE, ... (the last cut at the document's
    end), each token scored by the first window that predicts it; NaN at position 0. In the
    model's precision (float64 values, not rounded)."""
    import torch
    import torch.nn.functional as F

    n = len(doc)
    values = np.full(n, np.nan, dtype=np.float64)
    done, start = 0, 0
    dev = next(model.parameters()).device
    while done < n - 1:
        window = torch.from_numpy(doc[start : start + SEQ + 1]).to(dev)
        with torch.no_grad():
            x = window[None, :-1]
            logits = model(x, torch.arange(x.shape[1], device=dev)[None], None)  # [1, w, v]
        losses = F.cross_entropy(logits[0], window[1:], reduction="none").cpu().numpy()
        values[done + 1 : start + len(window)] = losses[done - start :]
        done, start = start + len(window) - 1, start + STRIDE
    return values


def _sync_free_worker(rank, world, device="cpu"):
    """Rounds 2.. of the pipeline counted by the sync counter; on CUDA also under
    ``torch.cuda.set_sync_debug_mode("error")`` (a synchronising call raises), with an NCCL group
    for the round collective, as the scorer has on GPUs."""
    import contextlib

    import torch
    import torch.distributed as dist

    from megatron_slm.scoring.pipeline import ScoringPipeline
    from tests.sync_counter import SyncCounter

    lm = _tiny_lm(seed=3, device=device)
    cuda = lm.device.type == "cuda"
    modes = []  # inference mode at each forward of the pipeline
    hook = lm.chunks[0].register_forward_pre_hook(
        lambda *_: modes.append(torch.is_inference_mode_enabled())
    )
    docs = _documents(DOCS_PER_CHUNK * ROUNDS, seed=11)
    chunks = _chunks(docs, pin=cuda)
    written = {}
    pipe = ScoringPipeline(
        lm,
        is_writer=True,
        write=lambda c: written.setdefault(c.first_doc, c.values.copy()),
        group=dist.new_group([0], backend="nccl") if cuda else None,
    )
    pipe.run_round(chunks[0])  # warm-up: first calls allocate and pick kernels
    pipe.flush()  # --dry-run's wait: round 0 done and counted (run_round alone counts it later)
    flushed = pipe.totals.documents
    pipe.run_round(chunks[1])  # ... and the first round collective
    strict = contextlib.nullcontext()
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
        strict = contextlib.ExitStack()
        strict.callback(torch.cuda.set_sync_debug_mode, "default")
    with strict, SyncCounter() as counter:
        for chunk in chunks[2:]:
            pipe.run_round(chunk)
    totals = pipe.close()
    hook.remove()
    batches = sum(len(s) for c in chunks[2:] for s in c.schedules)
    values = np.concatenate([written[c.first_doc] for c in chunks])
    plain = np.concatenate([_plain_losses(lm.chunks[0], d) for d in docs])  # float32 model
    lm.chunks[0].double()
    exact = np.concatenate([_plain_losses(lm.chunks[0], d) for d in docs])
    return (
        counter.count,
        counter.report(),
        batches,
        values,
        plain,
        exact,
        totals.__dict__,
        modes,
        flushed,
    )


def check_sync_free_and_exact(result) -> None:
    """The assertions on one :func:`_sync_free_worker` result (shared with the GPU twin). The
    values are held to the float64 forward within twice the error of the plain float32 forward
    on the same device (the same-precision rule of the op's tests) plus one float32 ulp of the
    largest loss: float32 values are whole ulps apart, and the fused loss (``__expf`` on a GPU)
    may round once more than ``F.cross_entropy``."""
    count, report, batches, values, plain, exact, totals, modes, flushed = result
    assert flushed == DOCS_PER_CHUNK
    assert batches >= 3 * (ROUNDS - 2)  # several scorer batches per counted round
    assert len(modes) >= batches and all(modes)  # every forward in inference mode
    assert count == 0, report
    np.testing.assert_array_equal(np.isnan(values), np.isnan(exact))
    ok = ~np.isnan(exact)
    ulp = np.spacing(np.float32(np.abs(exact[ok]).max()))
    tol = 2 * np.abs(plain[ok] - exact[ok]).max() + ulp
    assert tol < 1e-4  # a float32 forward's error
    np.testing.assert_allclose(values[ok], exact[ok], rtol=0, atol=tol)
    assert totals["documents"] == DOCS_PER_CHUNK * ROUNDS and totals["tokens"] == len(values)
    assert totals["loss_count"] == ok.sum()
    assert totals["loss_sum"] == pytest.approx(exact[ok].sum(), rel=1e-6)


def test_main_thread_never_syncs_and_values_are_exact():
    check_sync_free_and_exact(run_distributed(_sync_free_worker, 1)[0])


def _failing_writer_worker(rank, world):
    from megatron_slm.scoring.pipeline import ScoringPipeline

    lm = _tiny_lm(seed=3)
    chunks = _chunks(_documents(DOCS_PER_CHUNK * 2 * ROUNDS, seed=5 + rank))[rank::2]
    rounds = []

    def write(chunk):
        if rank == 1 and len(rounds) == 2:
            raise OSError("No space left on device")
        rounds.append(chunk.first_doc)

    pipe = ScoringPipeline(lm, is_writer=True, write=write)
    try:
        for chunk in chunks:
            pipe.run_round(chunk)
        pipe.close()
    except Exception as e:  # noqa: BLE001 - the test looks at each rank's error
        return f"{type(e).__name__}: {e}", len(rounds)
    finally:
        pipe.abort()
    return None, len(rounds)


def test_host_worker_failure_ends_every_rank():
    (err0, written0), (err1, written1) = run_distributed(_failing_writer_worker, 2)
    assert err1 == "OSError: No space left on device" and written1 == 2
    assert err0.startswith("ScoringError: 1 rank(s) failed while scoring"), err0
    assert written0 < ROUNDS  # stopped early, after the same collective as rank 1


def test_prefetcher_order_and_errors():
    from megatron_slm.scoring.pipeline import Prefetcher

    def make(i):
        if i == 3:
            raise ValueError("bad chunk 3")
        return i * i

    p = Prefetcher(make, 5, depth=1)
    assert [p.get() for _ in range(3)] == [0, 1, 4]
    with pytest.raises(ValueError, match="bad chunk 3"):
        p.get()
    p.close()
    p = Prefetcher(make, 10, depth=1)  # closed early: the thread stops, nothing hangs
    assert p.get() == 0
    p.close()
