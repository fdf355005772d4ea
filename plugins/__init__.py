"""dqr's built-in plugins: ordinary plugins using the public hooks."""
