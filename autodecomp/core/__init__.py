"""Ground floor: ConvSpec, user-facing errors, atomic files and locks, the Shift op, the version."""
