"""The training loop's batches under Ray Data's local shuffle, through the real loop, Ray Train and
MLflow, over two whole passes of the data: a system that trains nothing but logs which rows each
batch held."""

from __future__ import annotations

import sys

import mlflow
import ray.cloudpickle
import torch

from vidray.config import load_config
from vidray.config.train import PretrainConfig
from vidray.train.job import run_training
from vidray.train.loop import shuffle_options

ROWS = 64
# Ray Train's workers cannot import this test module: its functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _row_logging_system(cfg, device):
    """One weight (the optimizer needs a parameter); each step logs its batch's rows as metrics."""

    class RowLogger:
        def __init__(self):
            self.model = torch.nn.Linear(1, 1)

        @staticmethod
        def collate(batch):
            return {"id": torch.as_tensor(batch["id"])}

        def training_step(self, batch):
            ids = batch["id"].tolist()
            loss = self.model(batch["id"].float().view(-1, 1)).mean() * 0
            return loss, {"first_row": float(ids[0]),
                          "in_dataset_order": float(all(b == a + 1 for a, b in zip(ids, ids[1:])))}

    return RowLogger()


PASS_STEPS = 56  # repeat_for_steps makes a pass of 7 copies of the 64 rows: 448 rows, 56 batches of 8


def _run(stack, tmp_path, name: str, shuffle_buffer: int) -> dict[str, list[float]]:
    """Two whole passes on one worker, with Ray Data's block order fixed: what differs between
    the passes is the shuffle alone."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        cfg = load_config(PretrainConfig, None, [
            f"train.steps={2 * PASS_STEPS}", "train.batch_size=8", "train.num_workers=1",
            f"train.checkpoint_every={2 * PASS_STEPS}", f"train.shuffle_buffer={shuffle_buffer}",
            f"train.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={stack.env['MLFLOW_TRACKING_URI']}",
            "mlflow.experiment=test-shuffle"])
        report = run_training(cfg, job="shuffle", experiment="test-shuffle", run_name=name,
                              build_system=_row_logging_system, make_dataset=lambda: ray.data.range(ROWS),
                              tags={}, say=lambda m: None)
    finally:
        context.execution_options.preserve_order = before
    client = mlflow.MlflowClient()
    # MLflow 3's UI opens the experiment as model training, not in its GenAI (Traces) view.
    assert client.get_experiment_by_name("test-shuffle").tags["mlflow.experimentKind"] == "custom_model_development"
    return {key: [m.value for m in sorted(client.get_metric_history(report["mlflow_run_id"], key),
                                          key=lambda m: m.step)]
            for key in ("first_row", "in_dataset_order")}


def test_batches_are_shuffled_every_epoch_and_read_in_order_when_turned_off(ray_cluster, stack, tmp_path):
    shuffled = _run(stack, tmp_path, "shuffled", shuffle_buffer=32)
    assert len(shuffled["in_dataset_order"]) == 2 * PASS_STEPS
    # Eight consecutive ids in order by chance: about one batch in 32**7 / 8 draws.
    assert sum(shuffled["in_dataset_order"]) == 0, shuffled
    # The second pass is not a replay of the first (the seed follows the epoch).
    first, second = shuffled["first_row"][:PASS_STEPS], shuffled["first_row"][PASS_STEPS:]
    assert sum(a == b for a, b in zip(first, second)) < PASS_STEPS // 4, (first, second)

    ordered = _run(stack, tmp_path, "ordered", shuffle_buffer=0)
    assert all(ordered["in_dataset_order"]), ordered
    # Unshuffled, both passes read the same rows in the same order.
    assert ordered["first_row"][:PASS_STEPS] == ordered["first_row"][PASS_STEPS:]


def test_shuffle_seeds_differ_per_worker_and_epoch_and_repeat_for_the_same_epoch():
    cfg = load_config(PretrainConfig, None, ["train.shuffle_buffer=128", "train.seed=3"]).train
    seeds = {shuffle_options(cfg, rank, epoch)["local_shuffle_seed"] for rank in (0, 1) for epoch in (0, 1)}
    assert len(seeds) == 4
    assert shuffle_options(cfg, 1, 1) == shuffle_options(cfg, 1, 1)
    assert shuffle_options(cfg, 0, 0)["local_shuffle_buffer_size"] == 128
    off = load_config(PretrainConfig, None, ["train.shuffle_buffer=0"]).train
    assert shuffle_options(off, 0, 0) == {}


def test_the_loop_hands_ray_data_a_collate_class_not_a_deprecated_function(ray_cluster):
    import warnings

    from vidray.train.loop import batch_collate

    system = _row_logging_system(None, "cpu")
    with warnings.catch_warnings():
        # Ray 2.60: "Passing a function to `iter_torch_batches(collate_fn)` is deprecated ..."
        warnings.filterwarnings("error", message="Passing a function to `iter_torch_batches")
        batches = list(ray.data.range(8).iter_torch_batches(batch_size=4, collate_fn=batch_collate(system)))
    # Rows in batches of 4, every row once (Ray Data keeps no order across blocks unless asked).
    assert [len(b["id"]) for b in batches] == [4, 4]
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(8))
