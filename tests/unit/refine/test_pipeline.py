"""The apply-mode pipeline: outputs, statistics, bad input, sharding across real processes, and
SIGKILL + rerun byte identity."""

import json
import os
import random
import subprocess
import sys

import pytest

from megatron_slm.refine.config import ApplyConfig, RunConfig
from megatron_slm.refine.pipeline import KILL_HOOK_ENV, refine_corpus
from tests import zygote
from tests.unit.refine import read_jsonl, run_tool, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
TOOL = os.path.join(REPO, "tools", "prox_refine.py")

LINE = "line {j} of doc {i} has some words"


def doc_text(i, n=6):
    return "\n".join(LINE.format(i=i, j=j) for j in range(n))


@pytest.fixture
def small(tmp_path):
    """Six documents over two files, one per decision, with hand-computed results."""
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = [{"id": i, "text": doc_text(i), "source": f"s{i}"} for i in range(5)]
    docs.append({"id": 5, "text": "", "metadata": {"url": "u5"}})
    write_jsonl(raw / "a.jsonl", docs[:3])
    write_jsonl(raw / "b.jsonl", docs[3:])
    programs = [
        {
            "id": 0,
            "doc_program": "keep_doc()",
            "chunk_program": "remove_lines(line_start=0, line_end=1)\n"
            "normalize(source_str='words', target_str='WORDS, \"quoted\"')",
        },
        {"id": 1, "doc_program": "drop_doc()", "chunk_program": None},
        {"id": 2, "chunk_program": "bogus\nremove_lines(99, 100)"},
        {"id": 3, "chunk_program": "remove_lines(0, 5)"},
        {"id": 4, "doc_program": "keep_doc()"},
        {"id": 5, "chunk_program": "keep_chunk()"},
    ]
    write_jsonl(tmp_path / "programs.jsonl", programs)
    return tmp_path


def run_apply(root, out="out", **run_kwargs):
    run = RunConfig(input=[str(root / "raw" / "*.jsonl")], output_dir=str(root / out), **run_kwargs)
    mode = ApplyConfig(programs=str(root / "programs.jsonl"))
    return refine_corpus(run, mode, rank=0, world_size=1, log=lambda *_: None)


def test_apply_outputs(small):
    report = run_apply(small)
    assert report.complete and report.shards_total == 2
    out = small / "out"
    kept = read_jsonl(out / "a.jsonl") + read_jsonl(out / "b.jsonl")
    dropped = read_jsonl(out / "dropped" / "a.jsonl") + read_jsonl(out / "dropped" / "b.jsonl")
    assert [r["id"] for r in kept] == [0, 2, 4]
    assert [r["id"] for r in dropped] == [1, 3, 5]

    refined = "\n".join(LINE.format(i=0, j=j) for j in range(2, 6))
    assert kept[0]["text"] == refined.replace("words", 'WORDS, "quoted"')
    assert kept[0]["source"] == "s0"  # other fields kept
    meta = kept[0]["metadata"]
    assert meta["raw_text"] == doc_text(0)
    assert meta["doc_program"] == "keep_doc()"
    assert meta["chunk_program"].startswith("remove_lines(line_start=0")
    assert meta["prox"] == {
        "decision": "refined",
        "doc_errors": [],
        "chunk_errors": [],
        "lines_removed": 2,
        "normalizations": 1,
    }
    # two errors: the original is kept, the errors are recorded with their program lines
    assert kept[1]["text"] == doc_text(2)
    assert kept[1]["metadata"]["prox"]["decision"] == "original"
    assert [e[0] for e in kept[1]["metadata"]["prox"]["chunk_errors"]] == [1, 2]
    assert kept[2]["text"] == doc_text(4)
    assert kept[2]["metadata"]["prox"]["decision"] == "keep"
    assert kept[2]["metadata"]["chunk_program"] is None

    # dropped documents keep their original text, and their own metadata
    assert [r["metadata"]["prox"]["decision"] for r in dropped] == [
        "drop_doc",
        "drop_ratio",
        "drop_empty",
    ]
    assert [r["text"] for r in dropped] == [doc_text(1), doc_text(3), ""]
    assert dropped[2]["metadata"]["url"] == "u5"


def test_apply_stats(small):
    run_apply(small)
    stats = json.loads((small / "out" / "stats.json").read_text())
    totals = stats["totals"]
    words = 6 * 8  # six lines of eight words
    chars = len(doc_text(0))
    refined_words = 4 * (8 + 1)  # 'words' -> 'WORDS, "quoted"' adds a word per line
    assert totals["documents"] == 6 and totals["kept"] == 3 and totals["dropped"] == 3
    assert totals["decisions"] == {
        "drop_doc": 1,
        "drop_empty": 1,
        "drop_ratio": 1,
        "keep": 1,
        "original": 1,
        "refined": 1,
    }
    assert totals["lines_removed"] == 2 and totals["normalizations"] == 1
    # programs: doc 0 x2, doc 1 doc, doc 2 chunk, doc 3 chunk, doc 4 doc, doc 5 chunk = 7
    assert totals["programs"] == 7 and totals["programs_with_errors"] == 1
    assert totals["program_errors"] == 2 and totals["error_rate"] == round(1 / 7, 6)
    assert totals["words_before"] == 5 * words
    assert totals["words_after"] == refined_words + 2 * words
    assert totals["chars_before"] == 5 * chars
    assert set(stats["shards"]) == {"a", "b"}
    assert stats["shards"]["a"]["documents"] + stats["shards"]["b"]["documents"] == 6


def test_rerun_skips_finished_shards(small):
    run_apply(small)
    before = snapshot(small / "out")
    report = run_apply(small)
    assert report.shards_done_here == [] and sorted(report.shards_skipped) == ["a", "b"]
    assert snapshot(small / "out") == before


# ---------------------------------------------------------------------------------------------
# bad input: exit status 2, one line naming the file and line or the flag
# ---------------------------------------------------------------------------------------------
def apply_argv(root, out="out"):
    return [
        "apply",
        "--input",
        str(root / "raw" / "*.jsonl"),
        "--programs",
        str(root / "programs.jsonl"),
        "--output-dir",
        str(root / out),
    ]


def test_malformed_jsonl_names_file_and_line(small, capsys):
    with open(small / "raw" / "b.jsonl", "a") as f:
        f.write('{"id": 9, "text": "unterminated\n')
    code, err = run_tool(apply_argv(small), capsys)
    assert code == 2
    assert err.startswith("prox_refine apply: error: ")
    assert f"{small / 'raw' / 'b.jsonl'}:4: invalid JSON" in err


def test_missing_text_key(small, capsys):
    write_jsonl(small / "raw" / "b.jsonl", [{"id": 3, "text": "x"}, {"id": 4, "body": "y"}])
    code, err = run_tool(apply_argv(small), capsys)
    assert code == 2 and f"{small / 'raw' / 'b.jsonl'}:2: no 'text' key (--text-key)" in err


def test_missing_program(small, capsys):
    write_jsonl(small / "programs.jsonl", [{"id": 0, "chunk_program": "keep_chunk()"}])
    code, err = run_tool(apply_argv(small), capsys)
    assert code == 2 and f"{small / 'raw' / 'a.jsonl'}:2: no program for id 1 in" in err


def test_bad_programs_file(small, capsys):
    write_jsonl(small / "programs.jsonl", [{"id": 0}, {"id": 0}])
    code, err = run_tool(apply_argv(small), capsys)
    assert code == 2 and f"{small / 'programs.jsonl'}:2: duplicate id 0 (first at line 1)" in err
    write_jsonl(small / "programs.jsonl", [{"id": 0, "chunk_program": 5}])
    code, err = run_tool(apply_argv(small), capsys)
    assert code == 2 and ":1: 'chunk_program' must be a string or null" in err


def test_missing_input(small, capsys):
    argv = apply_argv(small)
    argv[2] = str(small / "nothing*.jsonl")
    code, err = run_tool(argv, capsys)
    assert code == 2 and "--input" in err and "no such file" in err


def test_output_dir_of_another_run(small, capsys):
    run_apply(small)
    write_jsonl(
        small / "programs.jsonl", [{"id": i, "doc_program": "keep_doc()"} for i in range(6)]
    )
    code, err = run_tool(apply_argv(small), capsys)
    assert code == 2
    assert "holds another run's shards" in err and "differs in: programs" in err


def test_output_dir_with_foreign_shards(small, capsys):
    os.makedirs(small / "out")
    (small / "out" / "x.jsonl").write_text("{}\n")
    code, err = run_tool(apply_argv(small), capsys)
    assert code == 2 and "without a run.json" in err


def test_flag_validation(small, capsys):
    code, err = run_tool(apply_argv(small) + ["--shard-index", "2", "--num-shards", "2"], capsys)
    assert code == 2 and "--shard-index must be in [0, --num-shards 2)" in err
    code, err = run_tool(["--input", "x", "--output-dir", "y", "--stage", "chunk"], capsys)
    assert code == 2 and "--stage chunk needs --chunk-model" in err
    base = ["--input", "x", "--output-dir", "y", "--doc-model", "m", "--stage", "doc"]
    code, err = run_tool(base + ["--backend", "vllm"], capsys)
    assert code == 2 and "--backend" in err and "invalid choice: 'vllm'" in err
    code, err = run_tool(base + ["--backend", "openai"], capsys)
    assert code == 2 and "--backend openai needs --endpoint URL" in err
    code, err = run_tool(base + ["--endpoint", "http://localhost:1/v1"], capsys)
    assert code == 2 and "--endpoint and --model are for --backend openai" in err
    code, err = run_tool(
        ["--input", "x", "--output-dir", "y", "--doc-model", "a", "--chunk-model", "b",
         "--backend", "openai", "--endpoint", "http://localhost:1/v1"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "--backend openai serves one model" in err
    code, err = run_tool(base + ["--semantics", "loose"], capsys)
    assert code == 2 and "--semantics" in err and "invalid choice: 'loose'" in err
    code, err = run_tool(
        ["--input", "x", "--output-dir", "y", "--chunk-model", "m", "--stage", "chunk",
         "--line-prefix", "[]"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "--line-prefix '[]' does not contain {i}" in err


# ---------------------------------------------------------------------------------------------
# real processes: sharding and SIGKILL
# ---------------------------------------------------------------------------------------------
def snapshot(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture
def corpus(tmp_path):
    """Five shards of random multi-line documents with random (partly broken) programs."""
    rng = random.Random(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    programs, doc_id = [], 0
    for s in range(5):
        docs = []
        for _ in range(rng.randint(8, 15)):
            n = rng.randint(1, 20)
            text = "\n".join(
                " ".join(
                    rng.choice(["ab", "cd", "ef", "g,h", "(x)"]) for _ in range(rng.randint(0, 9))
                )
                for _ in range(n)
            )
            docs.append({"id": doc_id, "text": text})
            ops = []
            for _ in range(rng.randint(0, 4)):
                a = rng.randint(0, n + 2)
                ops.append(
                    rng.choice(
                        [
                            f"remove_lines(line_start={a}, line_end={a + rng.randint(-1, 4)})",
                            'normalize(source_str="g,h", target_str="G(H)")',
                            "keep_chunk()",
                            "garbage(",
                        ]
                    )
                )
            programs.append(
                {
                    "id": doc_id,
                    "doc_program": rng.choice(["keep_doc()", "drop_doc()", None, "??"]),
                    "chunk_program": "\n".join(ops),
                }
            )
            doc_id += 1
        write_jsonl(raw / f"part-{s}.jsonl", docs)
    write_jsonl(tmp_path / "programs.jsonl", programs)
    return tmp_path


def spawn(argv, env_extra=None):
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", KILL_HOOK_ENV):
        env.pop(key, None)
    env.update(env_extra or {})
    return zygote.Popen(
        [sys.executable, TOOL, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_reference_run_is_consistent(corpus):
    run_apply(corpus, "ref")
    n_input = sum(len(read_jsonl(p)) for p in (corpus / "raw").glob("*.jsonl"))
    stats = json.loads((corpus / "ref" / "stats.json").read_text())["totals"]
    n_kept = sum(len(read_jsonl(p)) for p in (corpus / "ref").glob("*.jsonl"))
    n_dropped = sum(len(read_jsonl(p)) for p in (corpus / "ref" / "dropped").glob("*.jsonl"))
    assert n_kept + n_dropped == n_input == stats["documents"]
    assert (n_kept, n_dropped) == (stats["kept"], stats["dropped"])
    assert sum(stats["decisions"].values()) == n_input
    assert 0 < n_kept < n_input


@pytest.mark.slow
def test_two_ranks_and_shard_index_match_one_process(corpus):
    run_apply(corpus, "ref")
    reference = snapshot(corpus / "ref")
    ranks = [
        spawn(apply_argv(corpus, "ranks"), {"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)
    ]
    for p in ranks:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert snapshot(corpus / "ranks") == reference
    # a SLURM array of two jobs, one after the other
    for index in (0, 1):
        p = spawn(apply_argv(corpus, "array") + ["--shard-index", str(index), "--num-shards", "2"])
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert ("prox_refine total" in out) == (index == 1)
    assert snapshot(corpus / "array") == reference


@pytest.mark.slow
@pytest.mark.parametrize("point", ["document:1", "document:23", "commit:1", "commit:3"])
def test_sigkill_then_rerun_is_byte_identical(corpus, point):
    run_apply(corpus, "ref")
    reference = snapshot(corpus / "ref")
    p = spawn(apply_argv(corpus, "killed"), {KILL_HOOK_ENV: point})
    p.communicate(timeout=120)
    assert p.returncode == -9
    partial = snapshot(corpus / "killed")
    assert partial != reference and "stats.json" not in partial
    p = spawn(apply_argv(corpus, "killed"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert snapshot(corpus / "killed") == reference


def test_unicode_and_lone_surrogates_round_trip(small):
    docs = [
        {"id": 0, "text": "日本語の文書 with émojis 😀 " * 3 + "\nsecond line of text here ok"},
        {"id": 1, "text": "broken \ud800 surrogate " * 4},
    ]
    with open(small / "raw" / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")  # ASCII escapes, as many JSONL writers produce
    write_jsonl(small / "raw" / "b.jsonl", [])
    write_jsonl(
        small / "programs.jsonl",
        [{"id": 0, "chunk_program": "normalize('😀', '🙂')"}, {"id": 1, "chunk_program": ""}],
    )
    run_apply(small)
    kept = read_jsonl(small / "out" / "a.jsonl")
    assert kept[0]["text"] == docs[0]["text"].replace("😀", "🙂")
    assert kept[1]["text"] == docs[1]["text"]
    assert read_jsonl(small / "out" / "b.jsonl") == []


def test_progress_line(small, capsys):
    run_apply(small)
    err = capsys.readouterr().err
    final = [line for line in err.splitlines() if line.startswith("[prox_refine rank 0]")][-1]
    assert "100.0%" in final and "ETA" in final
    assert "6 docs | " in final and "docs/s" in final and "words/s" in final


def test_a_shard_being_written_by_another_job_is_refused(small, capsys):
    from megatron_slm.output_lock import OutputLock

    os.makedirs(small / "out" / "shards")
    with OutputLock(str(small / "out" / "shards" / "a.lock"), "test holder"):
        code, err = run_tool(apply_argv(small), capsys)
    assert code == 2 and "shard a of" in err and "being written by another job" in err
    assert not (small / "out" / "a.jsonl").exists()
    code = run_tool_ok(apply_argv(small))  # the holder is gone: the run goes through
    assert code == 0


def run_tool_ok(argv):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import prox_refine
    finally:
        sys.path.pop(0)
    return prox_refine.main(argv)


def test_cleanup_of_a_shard_spares_a_shard_named_like_its_temp_files(small):
    """Shard ``a.jsonl.tmp7`` writes ``a.jsonl.tmp7.jsonl`` next to shard ``a``'s ``a.jsonl``: a
    prefix glob ``a.jsonl.tmp*`` in ``a``'s cleanup deleted it (and its dropped file)."""
    os.rename(small / "raw" / "b.jsonl", small / "raw" / "a.jsonl.tmp7.jsonl")
    run_apply(small)
    out = small / "out"
    other = snapshot(out)
    other = {k: v for k, v in other.items() if "a.jsonl.tmp7" in k}
    assert sorted(other) == [
        "a.jsonl.tmp7.jsonl",
        "dropped/a.jsonl.tmp7.jsonl",
        "shards/a.jsonl.tmp7.json",
        "shards/a.jsonl.tmp7.lock",
    ]
    # shard a is redone (as after a crash), with stale files of its own writers planted
    os.remove(out / "shards" / "a.json")
    own_stale = [
        out / "a.jsonl.partial",
        out / "dropped" / "a.jsonl.partial",
        out / "shards" / ".a.json.x7_k2q9z.tmp",  # the atomic writer's mkstemp name
    ]
    for path in own_stale:
        path.write_text("stale")
    report = run_apply(small)
    assert report.shards_done_here == ["a"] and report.complete
    assert {k: v for k, v in snapshot(out).items() if "a.jsonl.tmp7" in k} == other
    assert not any(p.exists() for p in own_stale)
