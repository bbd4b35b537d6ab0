"""What survives of a fine-tune once its decoder is cast to the precision it is evaluated in."""

import torch

from blipinpaint.precision import survival_line, surviving_changes


def test_an_update_below_half_a_bf16_ulp_rounds_away_and_fp32_keeps_every_change():
    """Near 0.02 half a bf16 ulp is ~6e-5: lr 1e-6 steps vanish, a 1e-3 step stays; a weight that
    started at 0 keeps even a tiny change (bf16's ulp shrinks with the value)."""
    original = {"a": torch.full((4,), 0.02), "b": torch.zeros(3)}
    tuned = {"a": torch.tensor([0.02 + 1e-6, 0.02 + 2e-6, 0.02 + 1e-3, 0.02]), "b": torch.tensor([1e-6, 0.0, 0.0])}
    assert surviving_changes(original, tuned, torch.bfloat16) == {
        "dtype": "bf16", "weights": 7, "changed": 4, "survived": 2, "survived_share": 0.5}
    assert surviving_changes(original, tuned, torch.float32) == {
        "dtype": "fp32", "weights": 7, "changed": 4, "survived": 4, "survived_share": 1.0}
    fp16 = surviving_changes(original, tuned, torch.float16)  # ulp ~1.5e-5 near 0.02: 1e-6 and 2e-6 vanish too
    assert (fp16["dtype"], fp16["survived"]) == ("fp16", 2)
    unchanged = surviving_changes(original, original, torch.bfloat16)
    assert (unchanged["changed"], unchanged["survived_share"]) == (0, None)
    assert survival_line(unchanged) == ("decoder evaluated in bf16: 0 of the 0 weights fine-tuning changed survive "
                                        "the cast (none changed)")
    assert survival_line(surviving_changes(original, tuned, torch.bfloat16)).endswith("2 of the 4 weights "
                                                                                      "fine-tuning changed survive "
                                                                                      "the cast (50.0 %)")
