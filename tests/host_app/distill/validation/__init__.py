"""Environment validation and startup checks."""
