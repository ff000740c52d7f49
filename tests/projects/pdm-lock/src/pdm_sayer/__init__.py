"""Says its version."""
