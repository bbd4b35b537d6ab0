import torch

from blipinpaint.losses import LossWeights, blip_loss, caption_kl


def test_blip_loss_is_the_papers_formula():
    ssim = torch.tensor([0.8, 0.5])
    psnr = torch.tensor([25.0, 10.0])
    clip = torch.tensor([30.0, 20.0])
    # 0.5·(1−0.8) − 0.2·25 − 4·30 = −124.9 ; 0.5·(1−0.5) − 0.2·10 − 4·20 = −81.75 ; mean −103.325
    assert blip_loss(ssim, psnr, clip, LossWeights()).item() == torch.tensor(-103.325).item()
    weights = LossWeights(ssim=1.0, psnr=0.0, clip=0.0)
    assert blip_loss(ssim, psnr, clip, weights).item() == torch.tensor(0.35).item()


def test_better_predictions_lower_the_loss():
    base = blip_loss(torch.tensor([0.5]), torch.tensor([20.0]), torch.tensor([25.0]), LossWeights())
    for better in ((0.6, 20.0, 25.0), (0.5, 21.0, 25.0), (0.5, 20.0, 26.0)):
        assert blip_loss(*map(lambda v: torch.tensor([v]), better), LossWeights()) < base


def test_kl_is_zero_for_the_same_decoder_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    tokens = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert caption_kl(logits, logits, tokens).abs().item() < 1e-6
    assert caption_kl(logits, logits + torch.randn_like(logits), tokens).item() > 0
