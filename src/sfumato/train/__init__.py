"""Training sfumato's built-in model: synthetic captioned scenes (``scenes``), their deterministic analyser
(``score``) and the training stages."""
