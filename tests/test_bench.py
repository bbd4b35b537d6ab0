"""The GPU benchmark's code, run here on CPU with the tiny models: it must stay runnable
in one command on the day a GPU is lent (its figures are not asserted, only its logic)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from blipinpaint import builders
from blipinpaint.config import load_config

ROOT = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("gpu_inpaint", ROOT / "bench" / "gpu_inpaint.py")
gpu_inpaint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_inpaint)


@pytest.fixture(scope="module")
def bench_cfg(model_cache):
    return load_config(overrides=["inpaint.num_inference_steps=2"])


def test_unet_flops_count_guidance_and_steps(bench_cfg):
    pipe = builders.build_inpainter(bench_cfg).pipe
    size = builders.image_size(bench_cfg)
    one = gpu_inpaint.unet_tflop_per_image(pipe, size, steps=1, guided=False)
    assert one > 0
    assert gpu_inpaint.unet_tflop_per_image(pipe, size, steps=1, guided=True) == pytest.approx(2 * one)
    assert gpu_inpaint.unet_tflop_per_image(pipe, size, steps=5, guided=False) == pytest.approx(5 * one)


def test_bare_loop_and_ray_pool_run_and_the_pool_returns_every_image(bench_cfg, local_ray):
    batch = gpu_inpaint.masked_images(bench_cfg, 4)
    assert batch["image"].shape[0] == 4 and not any(batch["error"])
    pipe = builders.build_inpainter(bench_cfg).pipe
    assert gpu_inpaint.bare_loop(pipe, batch, 2, 2, 7.5, gpu_inpaint.torch.device("cpu")) > 0
    for fused in (False, True):
        assert gpu_inpaint.both_variants(pipe, batch, 2, 2, 7.5, gpu_inpaint.torch.device("cpu"), fused) > 0
    assert gpu_inpaint.ray_pool(bench_cfg, batch, 2, use_gpu=False) > 0


def test_the_gpu_bench_smoke_run_writes_every_section(local_ray, tmp_path):
    """`bash bench/gpu_bench.sh --smoke`, as BENCHMARKS.md gives it (on this session's Ray):
    every section of the GPU measurement runs and lands in its JSON."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "gpu_bench.json"
    env = {**os.environ, "PYTHON": sys.executable, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_bench.sh"), "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"environment", "inpaint", "generate", "finetune", "total"}
    assert result["environment"]["torch"] and result["environment"]["diffusers"]
    eager = result["inpaint"]["eager"]["2"]
    assert eager["fused_images_per_s"] > 0 and eager["pipeline_per_variant_images_per_s"] > 0
    compiled = result["inpaint"]["compiled"]
    assert compiled["fused_images_per_s"] > 0 and compiled["first_batch_s"] > 0
    generate = result["generate"]
    assert (generate["ok"], generate["errors"]) == (4, 0)
    assert {"captioner", "inpainter", "metrics"} <= set(generate["stages"])
    assert generate["stages"]["inpainter"]["busy_s"] > 0 and "samples" in generate["gpu"]
    assert result["finetune"]["bf16"]["step_s"] > 0 and "skipped" in result["finetune"]["fp16"]


def test_the_gpu_samplers_summary_of_nvidia_smi_lines():
    """What the GPU run parses (nvidia-smi's `utilization.gpu, memory.used` in CSV, no units),
    checked here where there is no nvidia-smi."""
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    sampler = gpu_bench.GpuSampler(period_ms=500)
    assert sampler.summary()["samples"] == 0  # no nvidia-smi started: said so, not a crash
    sampler.process, sampler.lines = object(), ["95, 30000", "100, 31000", "40, 12000", ""]
    summary = sampler.summary()
    assert summary["samples"] == 3 and summary["util_median"] == 95.0 and summary["memory_max_mib"] == 31000.0
    assert summary["share_above_90"] == round(2 / 3, 3) and summary["util_mean"] == 78.3


def test_the_stream_split_reads_the_marks_that_the_stream_prints(monkeypatch, capsys):
    """`bench/stream_split.py` times each pool's start from the lines `rayjobs.stream.trace`
    prints with $BLIPINPAINT_STREAM_TRACE set (none without it), as Ray forwards them."""
    from rayjobs import stream

    spec = importlib.util.spec_from_file_location("stream_split", ROOT / "bench" / "stream_split.py")
    split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split)
    monkeypatch.delenv(stream.TRACE_ENV, raising=False)
    stream.trace("inpainter init")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(stream.TRACE_ENV, "1")
    for what in ("inpainter init", "inpainter built", "inpainter batch", "inpainter done"):
        stream.trace(what)
    printed = capsys.readouterr().err
    at = [float(line.rsplit("at=", 1)[1]) for line in printed.splitlines()]
    forwarded = "".join(f"\x1b[36m(MapWorker(MapBatches(ModelStage)) pid=1)\x1b[0m {line}\n"
                        for line in printed.splitlines())
    begin = at[0] - 1.0
    output = (f"[driver-trace] imported at={begin - 2:.3f}\n[driver-trace] > ray.data.Dataset.materialize "
              f"at={begin:.3f}\n{forwarded}[driver-trace] < ray.data.Dataset.materialize at={at[-1] + 1:.3f}\n")
    summary = split.summarize(split.parse(output, begin - 5))
    (only,) = summary["streams"]
    pool = only["pools"]["inpainter"]
    assert pool["init_s"] == pytest.approx(1.0, abs=0.02) and pool["process_s"] < pool["init_s"]
    assert pool["init_s"] <= pool["built_s"] <= pool["first_batch_s"] <= pool["first_done_s"]
    assert summary["driver_imports_s"] == pytest.approx(3.0, abs=0.02)


def test_the_cpu_split_counts_each_process_of_a_run_once_under_its_role():
    """`bench/cpu_split.py` reads a process and its descendants only, each with its CPU and
    titles, and files a worker under the role of any title it showed (an actor's, before `IDLE`)."""
    spec = importlib.util.spec_from_file_location("cpu_split", ROOT / "bench" / "cpu_split.py")
    split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split)
    # A child that starts a grandchild, which says it is up, then waits on its stdin (the pipe both share).
    grandchild = "import sys; print('up', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                              f"{grandchild!r}])"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        found: dict = {}
        split.sample(psutil.Process(child.pid), found)
    finally:
        child.communicate()
    assert len(found) == 2 and child.pid in found  # the child and its grandchild, each read once
    assert [titles for _, titles in found.values()] == [[f"{sys.executable} -c {child.args[2]}"],
                                                        [f"{sys.executable} -c {grandchild}"]]
    seen = {10: (2.0, ["python -m rayjobs.pipeline run_dir=run"]),
            11: (1.0, ["/venv/ray/core/src/ray/raylet/raylet --raylet_socket_name=x"]),
            12: (3.0, ["ray::IDLE", "ray::MapWorker(MapBatches(ModelStage))", "ray::IDLE"]),
            13: (0.5, ["ray::IDLE", "ray::MapBatches(commit_part)"])}
    roles = split.summarize(seen)
    assert list(roles) == ["model actors of the streams (captioner, inpainter, metrics)",
                           "the driver (python -m rayjobs.pipeline)",
                           "Ray's daemons (GCS, raylet, dashboard, agents, monitors)",
                           "task workers (reads, commits, bootstrap; IDLE once done)"]
    assert [r["cpu_s"] for r in roles.values()] == [3.0, 2.0, 1.0, 0.5]
    assert split.role(["ray::RayTrainWorker", "ray::IDLE"]) == "Ray Train workers"
    assert split.role(["python -u agent.py", "ray::DashboardAgent"]).startswith("Ray's daemons")
    assert split.role(["something else"]) == "other"
