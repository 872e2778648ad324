"""Harvest: first-error records from a model's own generations (scoring units + Ray Data runs)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_harvest_model import save_nano

from selfcorrect import io
from selfcorrect.config import load_config
from selfcorrect.coverage import state_at
from selfcorrect.data import make_splits
from selfcorrect.generation import GenerationActor
from selfcorrect.harvest import (
    HARVEST_COLUMNS,
    OUTCOME_COLUMNS,
    requests_table,
    sample_seed,
    score_sample,
)
from selfcorrect.tasks import (
    RECOGNITION_LINE,
    classify_error,
    get_task,
    sample_error,
    split_lines,
)
from selfcorrect.traces import onpolicy_example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUL = get_task("multiplication", digits_a=2, digits_b=2)
SUD = get_task("sudoku", min_empty=4, max_empty=6)


def _problem(task, seed=0):
    return task.sample_problem(np.random.default_rng(seed))


# ---------------------------------------------------------------------------
# Scoring one completion (no Ray)
# ---------------------------------------------------------------------------


def test_golden_completion_is_correct_without_error():
    p = _problem(MUL)
    text = "".join(s + "\n" for s in MUL.golden_steps(p)) + MUL.answer_line(p) + "\n"
    out = score_sample(MUL, p, MUL.prompt(p), text)
    assert out["correct"] and out["answered"] and not out["has_error"]
    assert out["first_error_index"] == -1 and out["n_steps"] == len(MUL.golden_steps(p))


def test_first_wrong_step_is_recorded_with_its_prefix():
    p = _problem(MUL, 1)
    steps = MUL.golden_steps(p)
    lhs, value = steps[1].split("=")
    wrong = f"{lhs}={int(value) + 3}"
    later_wrong = steps[2].split("=")[0] + "=1"
    text = f"{steps[0]}\n{wrong}\n{later_wrong}\nANSWER 5\n"
    out = score_sample(MUL, p, MUL.prompt(p), text)
    assert out["has_error"] and not out["correct"]
    assert out["step_index"] == 1 and out["first_error_index"] == 1
    assert out["prefix_steps"] == [steps[0]]
    assert out["prefix"] == MUL.prompt(p) + "\n" + steps[0] + "\n"
    assert out["wrong_step"] == wrong and out["gold_step"] == steps[1]
    state = state_at(MUL, MUL.prompt(p), out["prefix_steps"])
    assert out["error_type"] == classify_error(MUL, state, wrong) == "int_10"


def test_malformed_line_and_premature_answer_are_kept_as_other():
    p = _problem(MUL, 2)
    steps = MUL.golden_steps(p)
    bad = score_sample(MUL, p, MUL.prompt(p), f"{steps[0]}\n12*=\n")
    assert bad["has_error"] and bad["error_type"] == "other" and bad["gold_step"] == steps[1]
    early = score_sample(MUL, p, MUL.prompt(p), f"{steps[0]}\nANSWER 12\n")
    assert early["has_error"] and early["wrong_step"] == "ANSWER 12"
    assert early["error_type"] == "other" and early["step_index"] == 1


def test_truncated_generation_is_no_error_and_not_correct():
    p = _problem(MUL, 3)
    out = score_sample(MUL, p, MUL.prompt(p), MUL.golden_steps(p)[0] + "\n")
    assert not out["has_error"] and not out["correct"] and not out["answered"]


def test_premature_answer_then_recognition_is_the_first_error_and_the_trace_can_be_right():
    """Issue 20.3: a premature ANSWER line is a wrong step the model can recognise; the
    answer it retracts is not the trace's answer."""
    p = _problem(MUL, 2)
    steps = MUL.golden_steps(p)
    text = "".join(s + "\n" for s in [steps[0], "ANSWER 12", RECOGNITION_LINE, *steps[1:]])
    out = score_sample(MUL, p, MUL.prompt(p), text + MUL.answer_line(p) + "\n")
    assert out["has_error"] and out["wrong_step"] == "ANSWER 12" and out["step_index"] == 1
    assert out["correct"] and out["answered"]
    assert out["n_steps"] == len(steps)  # answer lines are not steps
    # Retracted and never answered again: not answered.
    out = score_sample(MUL, p, MUL.prompt(p), text)
    assert not out["answered"] and not out["correct"]


def test_a_line_cut_by_the_token_cap_is_no_error():
    """Issue 20.4: ``5678*200=1135`` cut by max_new_tokens is neither an error nor a step."""
    p = _problem(MUL, 3)
    steps = MUL.golden_steps(p)
    cut = steps[1][:-1]
    assert not MUL.check_step(MUL.apply_step(MUL.initial_state(p), steps[0]), cut)
    out = score_sample(MUL, p, MUL.prompt(p), f"{steps[0]}\n{cut}")
    assert not out["has_error"] and out["first_error_index"] == -1 and out["n_steps"] == 1


def _agreement_texts(task, seed):
    p = _problem(task, seed)
    g = task.golden_steps(p)
    state = task.apply_step(task.initial_state(p), g[0])
    wrong, _ = sample_error(task, state, np.random.default_rng(seed))
    answer = task.answer_line(p)
    variants = [
        [*g, answer],
        [g[0], wrong, RECOGNITION_LINE, *g[1:], answer],
        [g[0], wrong, *g[1:], answer],
        [g[0], "ANSWER 12", RECOGNITION_LINE, *g[1:], answer],
        [g[0], "ANSWER 12", RECOGNITION_LINE, "ANSWER 12"],
        [g[0], "ANSWER 12"],
    ]
    return p, ["".join(line + "\n" for line in v) for v in variants]


@pytest.mark.parametrize("task", [MUL, SUD], ids=lambda t: t.name)
def test_harvest_and_eval_agree_on_every_truncation(task):
    """Issue 20.4: one definition of a complete line. Cut each completion at every character
    (as max_new_tokens would): harvest's first error is eval's first own error, and both
    agree on the final answer."""
    from selfcorrect.evaluate import own_errors, score_free_generation

    for seed in range(3):
        p, texts = _agreement_texts(task, seed)
        prompt = task.prompt(p)
        for text in texts:
            for k in range(len(text) + 1):
                cut = text[:k]
                h = score_sample(task, p, prompt, cut)
                own = own_errors(task, p, cut)
                assert h["has_error"] == bool(own), cut
                assert h["correct"] == score_free_generation(task, p, cut)["correct"], cut
                if own:
                    first = own[0]
                    assert h["line_index"] == first["step_index"], cut
                    for key in ("wrong_step", "gold_step", "error_type", "prefix"):
                        assert h[key] == first[key], (key, cut)


def test_recognition_retracts_a_committed_step():
    p = _problem(MUL, 4)
    steps = MUL.golden_steps(p)
    text = f"{steps[0]}\n{RECOGNITION_LINE}\n{steps[0]}\n{steps[1].split('=')[0]}=0\n"
    out = score_sample(MUL, p, MUL.prompt(p), text)
    assert out["prefix_steps"] == [steps[0]] and out["step_index"] == 1


def test_sudoku_gold_step_is_the_same_cell_when_possible():
    p = _problem(SUD, 5)
    state = SUD.initial_state(p)
    correct = SUD.correct_steps(state)
    cell, digit = correct[-1].split("=")
    wrong = f"{cell}={int(digit) % 4 + 1}"
    out = score_sample(SUD, p, SUD.prompt(p), wrong + "\n")
    assert out["has_error"] and out["gold_step"] == correct[-1]
    assert out["error_type"] in SUD.error_types


def test_requests_give_every_sample_its_own_stable_seed():
    cfg = load_config(os.path.join(REPO, "configs", "smoke.yaml"))
    problems = make_splits(MUL, 20, 5, 0)["test"]
    req = requests_table(problems, samples_per_problem=3, temperature=1.0, seed=cfg.seed)
    assert req.num_rows == 15
    seeds = req.column("seed").to_pylist()
    assert len(set(seeds)) == 15
    assert seeds[0] == sample_seed(cfg.seed, req.column("problem_id")[0].as_py(), 0)
    assert all(pre.endswith("\n") for pre in req.column("prefix").to_pylist())
    with pytest.raises(ValueError, match="temperature"):
        requests_table(problems, samples_per_problem=2, temperature=0.0, seed=0)


# ---------------------------------------------------------------------------
# Ray Data runs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smoke_cfg):
    """Smoke data for both tasks plus a briefly trained nano FT model per task."""
    out = str(tmp_path_factory.mktemp("harvest"))
    for name in ("multiplication", "sudoku"):
        task = get_task(name, **smoke_cfg.task_options(name))
        for split, table in make_splits(task, 60, 40, smoke_cfg.seed).items():
            io.write_parquet(os.path.join(out, name, "data", f"{split}.parquet"), table)
        save_nano(
            os.path.join(out, name, "models", "ft"),
            name,
            smoke_cfg.task_options(name),
            steps=40,
            batch=16,
        )
    return out


def _check_records(task, errors, outcomes, n_expected):
    assert outcomes.num_rows == n_expected
    keys = list(
        zip(
            outcomes.column("problem_id").to_pylist(),
            outcomes.column("sample_index").to_pylist(),
            strict=True,
        )
    )
    assert len(set(keys)) == n_expected  # nothing lost, nothing duplicated
    assert errors.num_rows == sum(outcomes.column("has_error").to_pylist())
    assert errors.num_rows > 0  # an under-trained model makes errors
    assert len(set(errors.column("error_id").to_pylist())) == errors.num_rows
    assert set(HARVEST_COLUMNS) <= set(errors.column_names)
    assert set(OUTCOME_COLUMNS) <= set(outcomes.column_names)
    for r in errors.to_pylist():
        problem = task.parse_prompt(r["prompt"])
        state = task.initial_state(problem)
        for step in r["prefix_steps"]:  # the model's own steps before the error all verify
            assert task.check_step(state, step)
            state = task.apply_step(state, step)
        assert not task.check_step(state, r["wrong_step"])
        assert task.check_step(state, r["gold_step"])
        assert r["error_type"] == classify_error(task, state, r["wrong_step"])
        assert r["step_index"] == len(r["prefix_steps"])
        assert r["prefix"].startswith(r["prompt"] + "\n")
        lines = split_lines(r["completion"])  # prefix = the model's lines, blank lines dropped
        assert r["prefix"] == r["prompt"] + "\n" + "".join(
            x + "\n" for x in lines[: r["line_index"]]
        )
        assert lines[r["line_index"]] == r["wrong_step"]
        # the hybrid trainer can build a trace from every record
        onpolicy_example(task, problem, r["prefix_steps"], r["wrong_step"], r["error_type"])


@pytest.mark.integration
def test_harvest_sampled_multiplication(ray_session, smoke_cfg, workspace):
    from rayjobs.harvest import harvest

    cfg = load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        [
            "harvest.samples_per_problem=2",
            "harvest.temperature=1.0",
            "harvest.batch_size=20",
            "harvest.num_actors=1",
        ],
    )
    model = os.path.join(workspace, "multiplication", "models", "ft")
    summary = harvest(cfg, "multiplication", model, "ft", "test", workspace)
    errors = pq.read_table(os.path.join(workspace, summary["artifacts"][0]))
    outcomes = pq.read_table(os.path.join(workspace, summary["artifacts"][1]))
    _check_records(MUL, errors, outcomes, 80)
    assert set(outcomes.column("sample_index").to_pylist()) == {0, 1}
    assert summary["n_errors"] == errors.num_rows
    assert summary["accuracy"] == np.mean(outcomes.column("correct").to_pylist())


def _crash_once_actor(marker: str, problem_id: str) -> type:
    """A GenerationActor whose process dies (os._exit) the first time it sees ``problem_id``."""

    class CrashOnceActor(GenerationActor):
        def __call__(self, batch):
            if problem_id in set(batch["problem_id"].tolist()):
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os._exit(1)
            return super().__call__(batch)

    return CrashOnceActor


@pytest.mark.integration
def test_killed_actor_still_gives_complete_duplicate_free_output(ray_session, workspace, tmp_path):
    from rayjobs.harvest import harvest

    cfg = load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        ["harvest.batch_size=8", "harvest.num_actors=2", "harvest.splits=[test]"],
    )
    model = os.path.join(workspace, "sudoku", "models", "ft")
    clean = harvest(cfg, "sudoku", model, "ft", "test", workspace)
    clean_errors = pq.read_table(os.path.join(workspace, clean["artifacts"][0]))
    clean_outcomes = pq.read_table(os.path.join(workspace, clean["artifacts"][1]))
    _check_records(SUD, clean_errors, clean_outcomes, 40)

    marker = str(tmp_path / "crashed")
    victim = "sudoku-test-000027"  # in the 4th of 5 batches: the actor dies mid-run
    crashed = harvest(
        cfg,
        "sudoku",
        model,
        "crash",
        "test",
        workspace,
        actor_cls=_crash_once_actor(marker, victim),
    )
    assert os.path.exists(marker)  # an actor really died
    errors = pq.read_table(os.path.join(workspace, crashed["artifacts"][0]))
    outcomes = pq.read_table(os.path.join(workspace, crashed["artifacts"][1]))
    _check_records(SUD, errors, outcomes, 40)
    # Greedy decoding: the re-run batch gives exactly the same records as the clean run.
    assert outcomes.drop(["model"]).equals(clean_outcomes.drop(["model"]))
    assert errors.column("completion").equals(clean_errors.column("completion"))
    assert errors.column("wrong_step").equals(clean_errors.column("wrong_step"))


@pytest.mark.integration
def test_harvest_and_coverage_jobs_run_and_skip(ray_session, workspace, capsys):
    """rayjobs entry points: both tasks, manifest records, second run is skipped."""
    from rayjobs import coverage as coverage_job
    from rayjobs import harvest as harvest_job
    from rayjobs.common import JobContext, read_manifest

    cfg = load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        ["harvest.splits=[train, test]", "coverage.n_samples=2000"],
    )
    ctx = JobContext(cfg, workspace)
    harvest_job.run(ctx)
    coverage_job.run(ctx)
    stages = read_manifest(ctx)["stages"]
    for name in ("multiplication", "sudoku"):
        for split in ("train", "test"):
            assert stages[f"{name}/harvest/ft-{split}"]["status"] == "done"
        assert stages[f"{name}/coverage/ft"]["status"] == "done"
        cov = pq.read_table(os.path.join(workspace, name, "coverage", "ft.parquet"))
        errs = pq.read_table(os.path.join(workspace, name, "harvest", "ft-test.parquet"))
        assert sorted(cov.column("error_id").to_pylist()) == sorted(
            errs.column("error_id").to_pylist()
        )
        assert all(n == 2000 or n == 0 for n in cov.column("n_samples").to_pylist())
        summary = pq.read_table(os.path.join(workspace, name, "coverage", "ft-summary.parquet"))
        assert summary.column("error_type")[0].as_py() == "all"
        assert summary.column("n_errors")[0].as_py() == cov.num_rows
    capsys.readouterr()
    harvest_job.run(ctx)
    coverage_job.run(ctx)
    assert capsys.readouterr().out.count("[skip]") == 6
