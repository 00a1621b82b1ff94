"""`make gpu-check`'s script (benchmarks/gpu_check.py) in its CPU dry run: the same jobs, configs
and figures it publishes on a GPU machine, with tiny models and a few steps, on the session's
cluster. No GPU was lent to the sessions so far; this keeps the script working until one is."""

from __future__ import annotations

import argparse

from benchmarks import gpu_check
from benchmarks.report import BENCHMARKS_MD


def test_the_gpu_check_runs_its_jobs_on_cpu_and_reads_their_figures(ray_cluster, tmp_path):
    parser = argparse.ArgumentParser()
    gpu_check.add_arguments(parser)
    before = open(BENCHMARKS_MD).read()
    result = gpu_check.run(parser.parse_args(["--dry-run", "--workdir", str(tmp_path)]))
    assert open(BENCHMARKS_MD).read() == before   # a dry run publishes nothing

    assert [t["model"] for t in result["train"]] == ["VLM tiny", "All-in-one tiny"]
    for run in result["train"]:
        # Rates from MLflow's metric timestamps, FLOPs from the loop's counter; no peak on a CPU.
        assert run["steps"] == 6 and run["steady_examples_per_s"] > 0 and run["mfu"] is None, run
        assert run["training_gflops_per_example"] > 0 and run["achieved_tflops"] > 0
    assert [(e["extractor"], e["pipeline"]) for e in result["extract"]] == [("s3d", "fused"), ("s3d", "split"),
                                                                           ("image2d", "fused")]
    assert all(e["videos"] == 6 and e["videos_per_s"] > 0 for e in result["extract"])

    section = gpu_check._markdown(result)   # what a GPU run writes into BENCHMARKS.md
    assert "cpu (dry run)" in section and "| VLM tiny |" in section and "| s3d | split | 1 |" in section
