"""What a study found: tables, Pareto fronts, reports, plots, proxy statistics."""
