"""Plans applied to models: plan entries, surgery, shift-block pruning, calibration statistics."""
