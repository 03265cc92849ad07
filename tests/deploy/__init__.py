"""Static checks of the deployment files in docker/ (no Docker engine needed)."""
