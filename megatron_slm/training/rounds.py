"""Training on a batch list (``--train-samples-from``, multiple-round training).

The list (``tools/resample_batches.py``) names batches of a source sample order. After checking
that the run's data and sampling flags are the ones the list was drawn for, the trainer builds
that order with the source's settings (the ``build_gpt_datasets`` call of
``data.sample_list.build_source_dataset``, with the source's train-sample count) and trains on
:class:`~megatron_slm.data.sample_list.SampleListDataset`: step ``k`` consumes batch
``batches[k]`` whole. ``consumed_samples`` counts samples of the list, so a checkpoint resumes
inside the round. ``--train-samples-record FILE`` appends, per step, the source sample ids the
step consumed (all data-parallel ranks), to check the above.

Every batch id is checked against the source's batch count when the list is read, in
``plan_training`` (before any process group, step or write: an id outside the order would
otherwise train silently on other samples, or index past the dataset mid-run), and that count
against the order the trainer builds, before the first step (:func:`wrap_train_dataset`).
"""

from __future__ import annotations

import json

from megatron_slm.data.sample_list import (
    BatchList,
    SampleListDataset,
    SampleListError,
    check_source,
    read_batch_list,
    source_settings,
)


def prepare_batch_list(cfg, sizes, checkpoint) -> BatchList | None:
    """Read and check ``--train-samples-from`` before any work (SampleListError naming the flag):
    the ids (``read_batch_list``), the run's data and sampling flags, its length, the checkpoint."""
    path = cfg.data.train_samples_from
    if not path:
        return None
    flag = f"--train-samples-from {path}"
    blist = read_batch_list(path)
    src = blist.source
    try:
        expected = source_settings(
            cfg.data.data_path,
            cfg.data.split,
            cfg.training.seq_length,
            cfg.training.seed,
            src.get("num_samples"),  # the source's train-sample count, not this round's
            sizes.global_batch_size,
        )
    except OSError as e:
        raise SampleListError(f"--data-path: cannot read a dataset ({e})") from None
    check_source(src, expected, flag, "this run")
    if sizes.train_iters > len(blist.batches):
        raise SampleListError(
            f"{flag} holds {len(blist.batches)} batches, fewer than the {sizes.train_iters} "
            "training steps (--train-iters / --train-tokens)"
        )
    if checkpoint is not None and not cfg.checkpoint.finetune:
        recorded = checkpoint.meta.get("sample_list") or {}
        if recorded.get("sha256") != blist.sha256:
            raise SampleListError(
                f"--load {checkpoint.path} was not trained on {flag} (it records "
                f"{recorded.get('path') or 'no batch list'}); start a round from the previous "
                "round's checkpoint with --finetune"
            )
    return blist


def wrap_train_dataset(blist: BatchList, source):
    """``source``: the train dataset built with the list's source settings (``num_samples``)."""
    n = len(source) if blist.source["num_samples"] is None else blist.source["num_samples"]
    n_batches = min(n, len(source)) // blist.source["global_batch_size"]
    if blist.source["batches"] != n_batches:  # the ids were checked against this count
        raise SampleListError(
            f"--train-samples-from {blist.path}: the source order has {n_batches} batches here, "
            f"{blist.source['batches']} when the list was made (another megatron-core version?)"
        )
    return SampleListDataset(source, blist.batches, blist.source["global_batch_size"])


def checkpoint_record(blist: BatchList | None) -> dict:
    return {} if blist is None else {"sample_list": {"path": blist.path, "sha256": blist.sha256}}


class SampleRecord:
    """Rank 0 appends (like ``--log-loss-file``) ``{"iteration", "samples"}`` per step: the
    source sample ids read by every data-parallel rank's micro-batch iterator during the step,
    in sample order."""

    def __init__(self, path: str | None, batches):
        self.path = path
        self.batches = batches
        if path:
            batches.read = []

    def skip(self) -> None:
        """A step that trained on nothing (--iterations-to-skip): its samples are not recorded."""
        if self.path:
            self.batches.read = []

    def step(self, iteration: int) -> None:
        if not self.path:
            return
        import torch.distributed as dist
        from megatron.core import parallel_state

        read, self.batches.read = self.batches.read, []
        dataset = self.batches.dataset
        ids = [dataset.source_index(i) if hasattr(dataset, "source_index") else i for i in read]
        if parallel_state.get_tensor_model_parallel_rank() or not (
            parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        ):
            return
        group = parallel_state.get_data_parallel_group()
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (read, ids), group=group)
        if dist.get_rank() == 0:
            pairs = sorted(p for r, i in gathered for p in zip(r, i))
            with open(self.path, "a") as f:
                f.write(json.dumps({"iteration": iteration, "samples": [i for _, i in pairs]}))
                f.write("\n")
