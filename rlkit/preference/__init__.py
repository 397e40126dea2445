"""What dpo, kto and train-rm share: pair and unpaired data options, sequence log-probs, the frozen reference."""
