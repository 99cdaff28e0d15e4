"""What a model costs: fvcore MACs and parameters, measured latency, per-plan cost."""
