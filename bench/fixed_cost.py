"""Where a run's first minute goes: the fixed costs of the embedded default, one at a time.

    .venv/bin/python bench/fixed_cost.py [--out bench/results/fixed_cost.json]

Each figure is measured in a fresh Python process (as a Ray worker starts one), with the
files already in the OS cache (a second run of a job, not the first after a boot):
- imports: torch, then transformers, diffusers and deepspeed on top of it;
- each model actor of the stream jobs (captioner, inpainter, metrics) as `ModelStage`
  builds it: the import of `blipinpaint.builders`, then the builder (its further imports
  and the model load, the tiny preset already built), and which heavy libraries it loaded;
- Ray: `ray.init` of a local Ray, and an actor's first call (a worker process starting);
- Ray Train: a 2-worker TorchTrainer (gloo) whose workers each import deepspeed and run
  `deepspeed.initialize` (ZeRO-2, a torch optimizer) on a small model, timed inside, and
  the trainer's wall time around it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

HEAVY = ("torch", "transformers", "diffusers", "deepspeed", "accelerate", "ray", "torchmetrics", "scipy", "sklearn")

IMPORTS = """
import json, time
out = {}
for name in ("torch", "transformers", "diffusers", "deepspeed"):
    start = time.perf_counter()
    __import__(name)
    out[name] = round(time.perf_counter() - start, 2)
print(json.dumps(out))
"""

STAGE = """
import json, sys, time
start = time.perf_counter()
from blipinpaint import builders
from blipinpaint.config import load_config
imported = time.perf_counter() - start
cfg = load_config()
start = time.perf_counter()
builders.{builder}(cfg)
built = time.perf_counter() - start
print(json.dumps({{"import_builders_s": round(imported, 2), "build_s": round(built, 2),
                  "heavy_modules": [m for m in {heavy!r} if m in sys.modules]}}))
"""

RAY = """
import json, time
start = time.perf_counter()
from rayjobs.cluster import connect
imported = time.perf_counter() - start
start = time.perf_counter()
connect()
started = time.perf_counter() - start
import ray

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return 1

start = time.perf_counter()
probe = Probe.remote()  # held: an actor whose handle is dropped is cancelled before it starts
ray.get(probe.ping.remote())
actor = time.perf_counter() - start
start = time.perf_counter()
ray.shutdown()
print(json.dumps({"import_s": round(imported, 2), "init_s": round(started, 2), "first_actor_call_s": round(actor, 2),
                  "shutdown_s": round(time.perf_counter() - start, 2)}))
"""

TRAIN = """
import json, tempfile, time
from pathlib import Path
from rayjobs.cluster import connect
connect()
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


def loop(config):
    import json, time
    start = time.perf_counter()
    import deepspeed  # noqa: F401
    import ray.train
    import torch

    from rayjobs.training import initialize
    imported = time.perf_counter() - start
    start = time.perf_counter()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    initialize(model, torch.optim.Adam(model.parameters(), lr=1e-4),
               {{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {{"stage": 2}}}})
    rank = ray.train.get_context().get_world_rank()
    with open(f"{{config['out']}}-{{rank}}.json", "w") as f:  # Train V2 keeps no metrics without a checkpoint
        json.dump({{"import_deepspeed_s": imported, "deepspeed_initialize_s": time.perf_counter() - start}}, f)


out = tempfile.mkdtemp() + "/rank"
start = time.perf_counter()
TorchTrainer(loop, train_loop_config={{"out": out}}, torch_config=TorchConfig(backend="gloo"),
             scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={{"CPU": 0.5}}),
             run_config=RunConfig(name="fixed-cost-{stamp}", storage_path={storage!r})).fit()
wall = time.perf_counter() - start
ranks = [json.loads(Path(f"{{out}}-{{r}}.json").read_text()) for r in range(2)]
print(json.dumps({{"trainer_wall_s": round(wall, 2),
                  "import_deepspeed_s": round(max(r["import_deepspeed_s"] for r in ranks), 2),
                  "deepspeed_initialize_s": round(max(r["deepspeed_initialize_s"] for r in ranks), 2)}}))
ray.shutdown()
"""


def fresh(code: str) -> dict:
    """Run `code` in a new interpreter of this tree; its last line of output, as JSON."""
    # A home of its own, as the tests have: Ray writes its token to ~/.ray, and another Ray
    # started meanwhile by the same user (another run) would replace it under this one.
    home = tempfile.mkdtemp(prefix="fixed-cost-home-")
    cache = os.environ.get("BLIPINPAINT_CACHE", str(Path.home() / ".cache" / "blipinpaint"))
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HOME": home,
                                   "BLIPINPAINT_CACHE": cache})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/fixed_cost.json")
    parser.add_argument("--sections", nargs="+", default=["imports", "actors", "ray", "train"])
    args = parser.parse_args()
    fresh("from blipinpaint import builders; from blipinpaint.config import load_config; "
          "builders.build_captioner(load_config()); print('{}')")  # the tiny preset built, the files in the OS cache
    result = {"command": "bench/fixed_cost.py", "date": date.today().isoformat(), "cpus": os.cpu_count(),
              "load_average_at_start": os.getloadavg()[0]}
    if "imports" in args.sections:
        result["imports_s"] = fresh(IMPORTS)
        print("imports:", result["imports_s"], flush=True)
    if "actors" in args.sections:
        result["actors"] = {}
        for stage, builder in (("captioner", "build_captioner"), ("inpainter", "build_inpainter"),
                               ("metrics", "build_metrics")):
            result["actors"][stage] = fresh(STAGE.format(builder=builder, heavy=HEAVY))
            print(stage, result["actors"][stage], flush=True)
    if "ray" in args.sections:
        result["ray"] = fresh(RAY)
        print("ray:", result["ray"], flush=True)
    if "train" in args.sections:
        storage = Path(tempfile.gettempdir()) / "blipinpaint-fixed-cost"
        result["ray_train"] = fresh(TRAIN.format(stamp=int(time.time()), storage=str(storage)))
        print("ray train:", result["ray_train"], flush=True)
    result["load_average_at_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
