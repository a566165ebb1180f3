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


def select_pieces(proto, counts: np.ndarray, vocab_size: int, flag: str = "--vocab-size"):
    """Choose ``vocab_size`` pieces of ``proto`` by ``counts`` (see the module docstring)."""
    kind = spm.model_type(proto)
    n_old = len(proto.pieces)
    mandatory = mandatory_ids(proto)
    if vocab_size < len(mandatory):
        raise TokenizerModelError(
            f"{flag} {vocab_size} is smaller than the {len(mandatory)} pieces every pruned model "
            "keeps (control, unknown, user-defined, byte-fallback and whitespace pieces)"
        )
    if vocab_size > n_old:
        raise TokenizerModelError(f"{flag} {vocab_size} is larger than the model's {n_old} pieces")
    normal = [i for i, p in enumerate(proto.pieces) if p.type == spm.NORMAL]
    unreachable = set(spm.unreachable_pieces(proto, normal))
    reachable = [i for i in normal if i not in unreachable]
    # Most frequent first; ties (and zero counts) in the original order.
    order = sorted(reachable, key=lambda i: (-float(counts[i]), i))
    closures = bpe_closures(proto, order) if kind == "bpe" else {i: [i] for i in order}
    kept = set(mandatory)
    by_closure: set[int] = set()
    budget = vocab_size - len(kept)
    remaining = order
    while budget > 0 and remaining:
        left = []
        for i in remaining:
            if i in kept:
                continue
            new = [j for j in dict.fromkeys(closures[i]) if j not in kept]
            if i not in new:  # the trace did not end in i: keep it on its own
                new.append(i)
            if len(new) <= budget:
                kept.update(new)
                by_closure.update(j for j in new if j != i)
                budget -= len(new)
                if budget == 0:
                    break
            else:
                left.append(i)
        if len(left) == len(remaining):
            break  # nothing fitted in a whole pass (cannot happen for a consistent trace)
        remaining = left
    extra = []
    if budget > 0:
        for i in sorted(unreachable) + [i for i in order if i not in kept]:
            if budget == 0:
                break
            if i not in kept:
                kept.add(i)
                extra.append(i)
                budget -= 1
    if budget > 0:
        raise TokenizerModelError(f"{flag} {vocab_size}: only {len(kept)} pieces can be kept")
    return Selection(
        kept=sorted(kept),
        mandatory=mandatory,
        by_closure=sorted(j for j in by_closure if j in kept),
        unreachable_in_original=sorted(j for j in extra if j in unreachable),
    )


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


def prune_model(proto, counts: np.ndarray, vocab_size: int) -> PruneResult:
    """Select, build and verify the pruned model (reachability checked with SentencePiece)."""
    selection = select_pieces(proto, counts, vocab_size)
    new = pruned_proto(proto, selection.kept)
    unreachable = spm.unreachable_pieces(new)
    return PruneResult(new, selection, unreachable)


def write_model(proto, path: str) -> None:
    """Write a ``.model`` file atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
