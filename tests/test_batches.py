import numpy as np

from blipinpaint.batches import Guarded, split_errors


def _batch():
    return {"id": np.array(["a", "b", "c"], dtype=object),
            "error": np.array(["", "corrupt image: x", ""], dtype=object),
            "value": np.array([1.0, 2.0, 3.0])}


def test_failed_rows_leave_the_stream_into_the_error_sink():
    sunk = []
    out = split_errors(_batch(), sunk.append)
    assert out["id"].tolist() == ["a", "c"] and out["value"].tolist() == [1.0, 3.0]
    assert len(sunk) == 1 and sunk[0]["id"].tolist() == ["b"] and sunk[0]["error"][0] == "corrupt image: x"
    clean = {**_batch(), "error": np.array(["", "", ""], dtype=object)}
    assert split_errors(clean, sunk.append) is clean and len(sunk) == 1


def test_a_failing_batch_is_retried_then_becomes_error_rows():
    calls, sunk = [], []

    def flaky(batch):
        calls.append(1)
        if len(calls) < 2:
            raise RuntimeError("transient")
        return dict(batch)

    clean = split_errors(_batch(), lambda rows: None)
    out = Guarded("captioner", flaky, sunk.append, retries=2)(clean)
    assert len(calls) == 2 and out["id"].tolist() == ["a", "c"] and not sunk
    assert out["seconds_captioner"].shape == (2,) and (out["seconds_captioner"] >= 0).all()
    assert out["retries_captioner"].tolist() == [1, 0]  # once per batch, so the writer's sum counts retries

    def broken(batch):
        calls.append(1)
        raise ValueError("bad weights")

    calls.clear()
    out = Guarded("inpainter", broken, sunk.append, retries=2)(clean)
    assert len(calls) == 3  # one try and two retries, then give up on this batch only
    assert len(out["id"]) == 0
    assert sunk[0]["id"].tolist() == ["a", "c"]
    assert set(sunk[0]["error"]) == {"stage failed: inpainter raised ValueError: bad weights"}
    assert sunk[0]["retries_inpainter"].sum() == 2


def test_empty_batches_pass_through():
    empty = {"id": np.array([], dtype=object), "error": np.array([], dtype=object)}
    assert Guarded("x", lambda b: 1 / 0, lambda rows: None)(empty) is empty
