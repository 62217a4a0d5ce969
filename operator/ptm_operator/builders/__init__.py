"""Pure builders: (model, settings) -> plain dict manifests. No API calls, no kopf."""
