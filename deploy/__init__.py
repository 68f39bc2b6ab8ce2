"""The process edge: settings, the CLI, the local stack, manifests."""
