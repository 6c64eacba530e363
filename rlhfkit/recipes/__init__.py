"""Support code of the application recipes in recipes/*.yaml (docs/recipes.md): data preparation
(rlhfkit.recipes.data). Reward functions live in rlhfkit.rewards (e.g. rlhfkit.rewards.mt:chrf)."""
