"""Prune a SentencePiece model (BPE or unigram) to N pieces by corpus frequency.

Kept, always: control, unknown and user-defined pieces, the byte-fallback pieces and the
whitespace piece ``▁`` (byte fallback cannot stand in for it: its bytes decode to a literal
``▁``). The rest are filled by frequency (ties: lower original id first, i.e. the earlier BPE
merge / higher score). Kept pieces keep their order, string, score and type, so the new ids are
the old ids renumbered (``new_to_old`` is increasing); the normalizer, model type and the other
specs are copied and ``trainer_spec.vocab_size`` is set to N.

**BPE merge closure (chosen over dropping unreachable pieces).** A BPE piece is only produced by
merging two symbols that are themselves produced, so removing an intermediate piece (``▁th``) can
make a longer kept piece (``▁the``) unreachable. The frequency order makes this common: intermediate
pieces are mostly merged away in the encoded corpus, so their counts are low even though every
occurrence of ``▁the`` went through them. Dropping unreachable pieces would drop exactly the long,
frequent pieces that give compression and leave their budget to rare ones, so instead a piece is
kept together with its closure: every piece the original model creates while encoding that piece's
own string (:func:`spm.bpe_trace`), and the single-character pieces of its string (SentencePiece
starts from characters whether or not they are pieces; Hugging Face's BPE, which the exported
``tokenizer.json`` uses, only merges pieces and would fall back to bytes). With all of them kept and
scores unchanged, the pruned model's greedy merges on that string are the original's (each chosen
pair is still present and still the best among a subset), so the piece stays producible. A candidate
whose closure does not fit in the remaining budget is skipped for now; later passes fill the
remainder (a piece whose intermediates are all kept needs one slot, so the budget is always filled
exactly). Reachability is then verified with SentencePiece itself: every kept piece's own string
must encode to exactly that piece.

Pieces that the *original* model cannot produce from their own string (possible for both BPE and
unigram) never occur in the counts; they are used only when N needs more pieces than the reachable
ones, and the report names them.

Unigram needs no closure: Viterbi segmentation of a piece's own string picks the piece itself when
it scores best, and removing other pieces only removes competing segmentations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from megatron_slm.atomic_io import write_bytes_atomic
from megatron_slm.tinylm import spm
from megatron_slm.tinylm.spm import TokenizerModelError


@dataclass
class Selection:
    """The kept pieces (old ids, increasing) and why each was kept."""

    kept: list[int]
    mandatory: list[int]
    by_closure: list[int] = field(default_factory=list)  # kept only as another piece's closure
    unreachable_in_original: list[int] = field(default_factory=list)  # kept anyway (N too large)


def mandatory_ids(proto) -> list[int]:
    """Control, unknown, user-defined and byte pieces, and the whitespace piece ``▁``: without it
    a space would fall back to the bytes of ``▁``, which decode to a literal ``▁``, not a space."""
    return [
        i
        for i, p in enumerate(proto.pieces)
        if p.type in spm.MANDATORY_TYPES or (p.type == spm.NORMAL and p.piece == spm.WHITESPACE)
    ]


def bpe_closures(proto, ids) -> dict[int, list[int]]:
    """For each id: the ids of its characters' pieces and of the pieces its own string's BPE trace
    creates (itself included). SentencePiece merges characters that are not pieces, Hugging Face's
    BPE (the exported tokenizer.json) only merges pieces: with the characters kept, both produce
    the same ids."""
    scores, index = {}, {}
    for i, p in enumerate(proto.pieces):
        if p.type in (spm.NORMAL, spm.USER_DEFINED):
            scores[p.piece] = p.score
            index[p.piece] = i
    frozen = tuple(
        sorted((p.piece for p in proto.pieces if p.type == spm.USER_DEFINED), key=len, reverse=True)
    )
    closures = {}
    for i in ids:
        text = proto.pieces[i].piece
        chars = [index[c] for c in text if c in index] if len(text) > 1 else []
        closures[i] = chars + [index[s] for s in spm.bpe_trace(text, scores, frozen)]
    return closures


class Ranking:
    """The frequency order of a model's pieces under ``counts`` and the closure groups that
    pruning keeps them in, computed once; :meth:`select` then chooses N pieces (see the module
    docstring) and :meth:`coverage` / :meth:`smallest_size` answer for any N cheaply, which the
    coverage curve and ``prune --coverage`` need at many N.

    Selection is first fit in frequency order: candidate ``k`` (with the pieces its closure adds,
    its *group*) is kept when the group fits in the budget left. Group ``k`` depends only on the
    groups before it, so the kept set for N is the longest prefix of groups that fits plus a short
    tail of first fits after the first group that does not (a budget smaller than that group),
    i.e. what one first-fit pass over all candidates gives, without replaying the prefix."""

    def __init__(self, proto, counts: np.ndarray):
        self.proto, self.counts = proto, counts
        self.kind = spm.model_type(proto)
        self.n_old = len(proto.pieces)
        self.mandatory = mandatory_ids(proto)
        normal = [i for i, p in enumerate(proto.pieces) if p.type == spm.NORMAL]
        self.selectable = len(set(self.mandatory) | set(normal))  # UNUSED pieces are never kept
        self.unreachable = sorted(spm.unreachable_pieces(proto, normal))
        unreachable = set(self.unreachable)
        reachable = [i for i in normal if i not in unreachable]
        # Most frequent first; ties (and zero counts) in the original order.
        self.order = sorted(reachable, key=lambda i: (-float(counts[i]), i))
        self.closures = (
            bpe_closures(proto, self.order) if self.kind == "bpe" else {i: [i] for i in self.order}
        )
        # rank[piece]: the candidate whose group keeps it (-1: mandatory; len(order): none).
        none = len(self.order)
        rank = [none] * self.n_old
        for i in self.mandatory:
            rank[i] = -1
        closure = [False] * self.n_old  # kept for another piece's closure
        sizes, group_counts = [], []
        for k, i in enumerate(self.order):
            if rank[i] != none:  # already kept by an earlier group
                sizes.append(0)
                group_counts.append(0.0)
                continue
            new = self._new(i, lambda j: rank[j] != none)
            for j in new:
                rank[j] = k
                closure[j] = j != i
            sizes.append(len(new))
            group_counts.append(float(np.sum(counts[new])))
        self.rank = np.asarray(rank, dtype=np.int64)
        self.closure = np.asarray(closure, dtype=bool)
        # ends[k]: pieces kept once candidates 0..k are; covered[k]: their counted tokens.
        m = len(self.mandatory)
        self.ends = m + np.cumsum(np.asarray(sizes, dtype=np.int64))
        base = float(np.sum(counts[self.mandatory]))
        self.covered = base + np.cumsum(np.asarray(group_counts, dtype=np.float64))
        self.base_covered = base
        self.total = float(np.sum(counts))

    def _new(self, i: int, kept) -> list[int]:
        """The pieces keeping candidate ``i`` adds (its closure not yet kept, and itself)."""
        new = [j for j in dict.fromkeys(self.closures[i]) if not kept(j)]
        if i not in new:  # the trace did not end in i: keep it on its own
            new.append(i)
        return new

    def _fit(self, vocab_size: int):
        """(prefix length j, tail pieces kept, of which kept for a closure, extra pieces)."""
        j = int(np.searchsorted(self.ends, vocab_size, side="right"))
        budget = vocab_size - (int(self.ends[j - 1]) if j else len(self.mandatory))
        tail: set[int] = set()
        tail_closure: set[int] = set()
        rank = self.rank

        def kept(x: int) -> bool:
            return rank[x] < j or x in tail

        remaining = self.order[j:]
        while budget > 0 and remaining:
            left = []
            for i in remaining:
                if kept(i):
                    continue
                new = self._new(i, kept)
                if len(new) <= budget:
                    tail.update(new)
                    tail_closure.update(x for x in new if x != i)
                    budget -= len(new)
                    if budget == 0:
                        break
                else:
                    left.append(i)
            if len(left) == len(remaining):
                break  # nothing fitted in a whole pass
            remaining = left
        extra = []
        if budget > 0:  # N needs more pieces than the reachable ones
            for i in self.unreachable + [i for i in self.order if not kept(i)]:
                if budget == 0:
                    break
                extra.append(i)
                budget -= 1
        return j, tail, tail_closure, extra, budget

    def _check_size(self, vocab_size: int, flag: str) -> None:
        m = len(self.mandatory)
        if vocab_size < m:
            raise TokenizerModelError(
                f"{flag} {vocab_size} is smaller than the {m} pieces every pruned model keeps "
                "(control, unknown, user-defined, byte-fallback and whitespace pieces)"
            )
        if vocab_size > self.n_old:
            raise TokenizerModelError(
                f"{flag} {vocab_size} is larger than the model's {self.n_old} pieces"
            )

    def select(self, vocab_size: int, flag: str = "--vocab-size") -> Selection:
        """Choose ``vocab_size`` pieces (see the module docstring)."""
        self._check_size(vocab_size, flag)
        j, tail, tail_closure, extra, budget = self._fit(vocab_size)
        if budget > 0:
            kept = int(np.sum(self.rank < j)) + len(tail) + len(extra)
            raise TokenizerModelError(f"{flag} {vocab_size}: only {kept} pieces can be kept")
        prefix = np.flatnonzero(self.rank < j)
        kept = sorted(set(prefix.tolist()) | tail | set(extra))
        by_closure = set(np.flatnonzero((self.rank < j) & self.closure).tolist()) | tail_closure
        unreachable = set(self.unreachable)
        return Selection(
            kept=kept,
            mandatory=self.mandatory,
            by_closure=sorted(by_closure),
            unreachable_in_original=sorted(i for i in extra if i in unreachable),
        )

    def coverage(self, vocab_size: int) -> float:
        """Share of the counted tokens whose piece :meth:`select` keeps at ``vocab_size``."""
        self._check_size(vocab_size, "--vocab-size")
        j, tail, _, extra, _ = self._fit(vocab_size)
        covered = self.covered[j - 1] if j else self.base_covered
        covered += float(np.sum(self.counts[sorted(tail | set(extra))]))
        return covered / self.total if self.total > 0 else float("nan")

    def smallest_size(self, target: float, flag: str = "--coverage") -> int:
        """The smallest N whose selection covers at least ``target`` of the counted tokens.

        Coverage is not monotone in N (a larger budget can fit an earlier candidate's closure of
        rare pieces instead of several frequent later pieces), so the answer is found by scanning
        N upwards from a bound below it: N pieces cover at most the mandatory pieces and the
        N - mandatory most frequent others."""
        if not self.total > 0:
            raise TokenizerModelError(f"{flag} {target}: the counts hold no tokens")
        m = len(self.mandatory)
        others = np.ones(self.n_old, dtype=bool)
        others[self.mandatory] = False
        best = np.sort(np.asarray(self.counts, dtype=np.float64)[others])[::-1]
        bound = (self.base_covered + np.concatenate([[0.0], np.cumsum(best)])) / self.total
        # (1 - 1e-9): the same sums in another order may round a little above the bound.
        n = m + int(np.searchsorted(bound, target * (1 - 1e-9), side="left"))
        for size in range(n, self.selectable + 1):
            if self.coverage(size) >= target:
                return size
        raise TokenizerModelError(
            f"{flag} {target}: even all {self.selectable} selectable pieces cover only "
            f"{self.coverage(self.selectable):.6f} of the counted tokens"
        )


def select_pieces(proto, counts: np.ndarray, vocab_size: int, flag: str = "--vocab-size"):
    """Choose ``vocab_size`` pieces of ``proto`` by ``counts`` (see the module docstring)."""
    return Ranking(proto, counts).select(vocab_size, flag)


def pruned_proto(proto, kept: list[int]):
    """A copy of ``proto`` with only the pieces ``kept`` (old ids, increasing)."""
    new = type(proto)()
    new.CopyFrom(proto)
    del new.pieces[:]
    for i in kept:
        new.pieces.append(proto.pieces[i])
    new.trainer_spec.vocab_size = len(kept)
    old_to_new = {old: n for n, old in enumerate(kept)}
    ts = new.trainer_spec
    # The special ids the trainer spec records follow their pieces (-1: the model has none).
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        old = getattr(ts, name)
        if old >= 0:
            setattr(ts, name, old_to_new.get(old, -1))
    return new


@dataclass
class PruneResult:
    proto: object  # the pruned ModelProto
    selection: Selection
    unreachable_kept: list[int]  # new ids of kept pieces that do not encode to themselves


def prune_model(
    proto, counts: np.ndarray, vocab_size: int, ranking: Ranking | None = None
) -> PruneResult:
    """Select, build and verify the pruned model (reachability checked with SentencePiece)."""
    selection = (ranking or Ranking(proto, counts)).select(vocab_size)
    new = pruned_proto(proto, selection.kept)
    unreachable = spm.unreachable_pieces(new)
    return PruneResult(new, selection, unreachable)


def write_model(proto, path: str) -> None:
    """Write a ``.model`` file atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_bytes_atomic(path, proto.SerializeToString())
