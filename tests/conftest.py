import os
import sys
from pathlib import Path

# Tests never touch a hub and keep transformers quiet; the repo root is importable as in `python retool.py`.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
