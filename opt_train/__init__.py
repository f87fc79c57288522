"""opt-train: a PyTorch-native reproduction of Meta's OPT pretraining."""
