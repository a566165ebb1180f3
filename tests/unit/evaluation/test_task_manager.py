"""lm-eval's task library is indexed only when a task needs it (thousands of YAML files)."""

import pytest

pytest.importorskip("lm_eval")

from megatron_slm.evaluation.harness import task_manager  # noqa: E402


def test_the_library_is_read_only_for_a_name_that_may_hold_its_tasks(tmp_path):
    ours = task_manager(["gsm8k_rho1", "rho1_math_tora"], [], {})
    assert {"gsm8k_rho1", "math_rho1_tora", "rho1_math_tora"} <= set(ours.all_tasks)
    assert "arc_easy" not in ours.all_tasks
    # a group on a given path may list built-in tasks, a tag there may be lm-eval's too (as a
    # built-in task, they read the library)
    (tmp_path / "group.yaml").write_text("group: mine\ntask:\n  - arc_easy\n  - gsm8k_rho1\n")
    (tmp_path / "tagged.yaml").write_text(
        "task: tagged\ntag: ai2_arc\ndataset_path: none\noutput_type: generate_until\n"
        "doc_to_text: q\ndoc_to_target: a\n"
    )
    for asked in ("mine", "ai2_arc"):
        manager = task_manager(["gsm8k_rho1", asked], [str(tmp_path)], {})
        assert {"arc_easy", "mine", "tagged", "gsm8k_rho1", "math_rho1"} <= set(manager.all_tasks)
