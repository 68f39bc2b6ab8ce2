"""Live model quality: signals joined with what the price did, and feature drift (faust app)."""
