"""The Optuna search: space, proxies, objective, allocation ladder, study, workers, storage."""
