"""MedSSL: self-supervised pretraining and evaluation for medical images."""
__version__ = "1.0.0"
