"""executor=ray's own behaviour on a real local Ray (the stages' outputs on Ray are compared
with the local executor's in test_dedup.py and test_reddit.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from data_pipeline.runtime.executors import connect_ray, run_steps
from data_pipeline.runtime.scaleout import RayOptions, ScaleOut, TaskStep


@dataclass
class _Plan:
    work: Path
    cfg: ScaleOut


class _FailsOnce(TaskStep):
    """Task 1 raises the first time it runs; every task counts its runs in a file."""

    name = "fails-once"

    def task(self, rank: int, world_size: int) -> dict:
        with open(self.work / f"runs-{rank}", "a") as f:
            f.write("x")
        flag = self.work / "failed-once"
        if rank == 1 and not flag.exists():
            flag.touch()
            raise RuntimeError("task 1 fails on its first run")
        return {"rank": rank}


@pytest.mark.slow  # a Ray actor per task: seconds of start-up each
def test_a_task_that_raised_on_ray_fails_the_step_and_a_rerun_redoes_it_alone(tmp_path, local_ray):
    cfg = ScaleOut(executor="ray", ray=local_ray, progress=False)
    plan = _Plan(tmp_path, cfg)
    with pytest.raises(RuntimeError, match=r"step fails-once: tasks \[1\] did not complete"):
        run_steps([(_FailsOnce(plan), 2)], cfg, tmp_path)
    runs = {r: (tmp_path / f"runs-{r}").read_text() for r in range(2)}
    assert runs == {0: "x", 1: "x"}
    run_steps([(_FailsOnce(plan), 2)], cfg, tmp_path)
    runs = {r: (tmp_path / f"runs-{r}").read_text() for r in range(2)}
    assert runs == {0: "x", 1: "xx"}  # the rerun ran task 1 only
    done = tmp_path / "executor" / "fails-once" / "completions"
    assert sorted(p.name for p in done.iterdir()) == ["00000", "00001"]


def test_a_ray_task_that_fits_no_node_is_refused_before_it_waits_forever(local_ray):
    with pytest.raises(ValueError, match=r"ray.cpus_per_task=3.*needs 3 CPUs"):
        connect_ray(ScaleOut(executor="ray", ray=RayOptions(cpus_per_task=3)))


def test_more_tasks_than_files_runs_one_per_file_and_says_so(tmp_path, capsys):
    from data_pipeline.stages.clean import CleanConfig
    from data_pipeline.stages.clean import run as clean

    (tmp_path / "in.jsonl").write_text('{"text": "' + "a real sentence here. " * 20 + '"}\n')
    report = clean(
        CleanConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o"), tasks=4)
    )
    assert report["tasks"] == 1
    assert "tasks=4: input files to share: 1, so 1 task (a task takes whole ones)" in (
        capsys.readouterr().err
    )
