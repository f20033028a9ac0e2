"""The same job under Cheetah (2 parties, no dealer): only the policy changes.

Cheetah spends much of its time on OT set-up and homomorphic matmuls, so expect it to be several
times slower than ABY3 or SEMI2K here.

    python examples/tune_sentiment_cheetah.py --budget 2
"""
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.exit(subprocess.call([sys.executable, str(here / "tune_sentiment_aby3.py"), "--policy", "cheetah",
                          "--out", "runs/example-mr-cheetah", *sys.argv[1:]]))
