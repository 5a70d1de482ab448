"""Libraries the stages and gates build on: log-probabilities, generation and rollout engines, reward-model
scoring, the rankings library and agreement statistics, Trainer plumbing, the RL algorithm tables."""
