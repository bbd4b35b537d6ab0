"""bench/train_timeline.py: a run's driver log and Ray Train's own logs merged into one timeline."""

import datetime
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_timeline", ROOT / "bench" / "train_timeline.py")
train_timeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_timeline)


def test_the_driver_lines_ray_trains_logs_and_hand_timestamps_merge_in_time_order(tmp_path):
    # Log lines carry local time; a hand timestamp is seconds since the epoch.
    stamp = datetime.datetime(2026, 12, 5, 8, 0, 12, 500000).timestamp()
    (tmp_path / "out.log").write_text(
        "2026-12-05 08:00:00,000 blipinpaint.train_scorer batch of 64 per optimizer step\n"
        "2026-12-05 08:00:00,500 ray.worker an INFO line of Ray itself: left out\n"
        f"\x1b[36m(RayTrainWorker pid=42)\x1b[0m T34 {stamp} sc ds init\n"
        "2026-12-05 08:00:20,000 rayjobs.cluster actor pools\n")
    logs = tmp_path / "ray" / "session_x" / "logs" / "train"
    logs.mkdir(parents=True)
    (logs / "ray-train-sys-controller-abcdef123.log").write_text("\n".join(json.dumps(r) for r in [
        {"asctime": "2026-12-05 08:00:05,000", "message": "Requesting resources"},
        {"asctime": "2026-12-05 08:00:15,000", "message": "Shutting down 2 workers."}]) + "\nnot json\n")
    timeline = train_timeline.events(str(tmp_path / "out.log"), str(tmp_path / "ray"))
    start = timeline[0][0]
    whats = [what for _, what in timeline]
    assert whats == ["driver: batch of 64 per optimizer step", "controller: Requesting resources",
                     "sc ds init [pid 42]", "controller: Shutting down 2 workers.", "driver: actor pools"]
    assert [round(t - start, 1) for t, _ in timeline][:2] == [0.0, 5.0]
