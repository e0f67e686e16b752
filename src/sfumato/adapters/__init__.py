"""Add-ons applied to a loaded pipeline: LoRA (more in issue 8)."""
