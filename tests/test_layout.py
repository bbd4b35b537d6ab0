from blipinpaint.layout import Folder, RunLayout


def test_a_run_folder_names_its_steps_on_a_disk_and_in_a_bucket():
    for root in ("/runs/a", "/runs/a/", "s3://bucket/runs/a/"):
        run = RunLayout(root)
        base = root.rstrip("/")
        assert run.generate.samples == f"{base}/generate/samples" and run.eval.report == f"{base}/eval/report.json"
        assert run.scorer_model == f"{base}/scorer/model" and run.finetune_check == f"{base}/finetune/check.json"
        assert isinstance(run.candidates / "x", Folder) and run.candidates.success == f"{base}/candidates/_SUCCESS"
