"""Reward functions shared by the tasks: answer extraction and checking, reward-function plugins
(with failure and timeout handling), and sequence-classification reward models."""
