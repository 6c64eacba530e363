"""Reward functions shipped with rlhfkit (the rlhfkit.plugins signature fn(prompts, completions, **columns)).

    reward.function=rlhfkit.rewards.mt:chrf        # translation: sentence chrF against the record's "reference"
    reward.function=rlhfkit.rewards.mt:bleu        # sentence BLEU; rlhfkit.rewards.mt:chrf_bleu, their mean
"""
