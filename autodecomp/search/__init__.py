"""The Optuna search: baseline, space, proxies, objective, allocation ladder, study, workers,
storage."""
