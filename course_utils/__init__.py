"""Shared package of the LLM course: runtime switches, exercise checks, data, and every model
the weeks build from scratch (imported from here once a notebook has built it)."""
from .exercises import check, list_exercises, reference, use
from .metrics import record
from .runtime import (autocast, by_profile, cache_dir, get_device, get_precision, get_profile, grad_scaler,
                      in_colab, seed_everything, setup)

__version__ = "0.1.0"

REPO_URL = "https://github.com/llm-course/llm-course"  # the one place the repository URL lives

__all__ = ["REPO_URL", "autocast", "by_profile", "cache_dir", "check", "get_device", "get_precision", "get_profile",
           "grad_scaler", "in_colab", "list_exercises", "record", "reference", "seed_everything", "setup", "use"]
