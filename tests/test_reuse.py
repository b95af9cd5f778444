"""One trainer per process serves every task: a late reset is an assignment, never a rebuild or retrace."""
from __future__ import annotations


def test_tasks_reuse_one_compiled_trainer(tmp_path, tf_runtime, tiny_config):
    from lthmpi.experiment import Experiment

    exp = Experiment(tiny_config, str(tmp_path / "run"), rank=0)
    exp.run.create(tiny_config)
    exp.train_parent()
    exp.compute_masks()
    tasks = exp.tasks()
    model, trainer = exp.model, exp.trainer
    exp.run_task(tasks[0])
    traces = (trainer._train_block.experimental_get_tracing_count(),
              trainer._eval_block.experimental_get_tracing_count())
    for task in tasks[1:]:
        exp.run_task(task)
        assert exp.model is model and exp.trainer is trainer
    assert (trainer._train_block.experimental_get_tracing_count(),
            trainer._eval_block.experimental_get_tracing_count()) == traces, "a task retraced the compiled step"
    assert len(exp.run.done_tasks()) == len(tasks)
