"""Bundled checkpoints. `DEFAULT_MODEL` is what every `hispec` command uses without --model."""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = MODELS_DIR / "hispec-stdlib-ee"
