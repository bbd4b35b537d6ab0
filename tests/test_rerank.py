"""Scorer-reranked captions (`caption.candidates`): the candidates, and the scorer's choice."""

import numpy as np
import torch
from helpers import take

from blipinpaint.captioning import Reranker, caption_features, caption_ids, visible_embeddings
from blipinpaint.losses import LossWeights
from blipinpaint.scorer import ScoreNet, ScoreNetConfig


def direction_scorer(direction: torch.Tensor) -> ScoreNet:
    """A linear scorer whose predicted SSIM is features · direction (PSNR and CLIP 0): it
    predicts the lowest L_BLIP for the caption whose features go furthest along it."""
    scorer = ScoreNet(ScoreNetConfig(in_features=len(direction), hidden=()))
    with torch.no_grad():
        scorer.mlp[0].weight.zero_()
        scorer.mlp[0].bias.zero_()
        scorer.mlp[0].weight[0] = direction
    return scorer.eval()


def reranker(captioner, direction, candidates, seed=0):
    return Reranker(captioner.bundle, direction_scorer(direction), LossWeights(), candidates, seed)


def test_one_candidate_is_the_greedy_caption(captioner, sample_batch):
    hidden = captioner.model.config.text_config.hidden_size
    out = reranker(captioner, torch.randn(hidden, generator=torch.Generator().manual_seed(0)), 1)(sample_batch)
    assert list(out["caption_reranked"]) == list(captioner(sample_batch)["caption"])


def test_reranking_picks_the_candidate_the_scorer_prefers(captioner, sample_batch):
    """The pick maximises the scorer's preferred direction over the candidates, checked
    against features computed here; the greedy caption is the first candidate."""
    model, tokenizer = captioner.model, captioner.bundle.tokenizer
    hidden = model.config.text_config.hidden_size
    with torch.inference_mode():
        embeds = visible_embeddings(captioner.bundle, sample_batch["image"], sample_batch["mask"])
        greedy = captioner(sample_batch)["caption"]
        picks = []
        for seed in range(3):  # three directions: the pick follows each
            direction = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
            stage = reranker(captioner, direction, 5)
            candidates, _ = stage.rank(sample_batch)
            chosen = stage(sample_batch)["caption_reranked"]
            for k, group in enumerate(candidates):
                assert group[0] == greedy[k] and len(group) == 5
                features = caption_features(model, embeds[k:k + 1].expand(len(group), -1, -1),
                                            caption_ids(model, tokenizer, group))
                assert chosen[k] == group[int(torch.argmax(features @ direction))]
            picks.append(list(chosen))
    # The candidates differ, and the choice is not always the greedy caption.
    assert any(p != list(greedy) for p in picks)
    assert len({tuple(p) for p in picks}) > 1


def test_candidates_are_seeded_per_sample(captioner, sample_batch):
    """Reruns, batch composition and order leave each image's candidates as they are; the
    global seed changes them; the sampled captions vary."""
    hidden = captioner.model.config.text_config.hidden_size
    stage = reranker(captioner, torch.ones(hidden), 4)
    torch.manual_seed(123)
    first, _ = stage.rank(sample_batch)
    torch.manual_seed(456)  # the actor's random state plays no part
    again, _ = stage.rank(sample_batch)
    alone, _ = stage.rank(take(sample_batch, [2]))
    reversed_, _ = stage.rank(take(sample_batch, [3, 2, 1, 0]))
    assert again == first and alone[0] == first[2] and reversed_[::-1] == first
    other, _ = reranker(captioner, torch.ones(hidden), 4, seed=1).rank(sample_batch)
    assert other != first and [g[0] for g in other] == [g[0] for g in first]
    assert sum(len(set(group[1:])) for group in first) > len(first)  # not one sample repeated
    assert all(isinstance(c, str) for group in first for c in group)
    assert np.unique([c for group in first for c in group]).size > len(first)
