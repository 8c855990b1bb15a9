"""UperNet on PlainMamba-L2 for ADE20K, the official recipe (schedule and arguments: configs/_seg.py).

  python -m toppax.main --config=configs/seg_plainmamba_l2.py:folder=/data/ADEChallengeData2016 \\
    --config.init_from=/path/to/official_plainmamba_l2.pth --workdir=/tmp/seg_plainmamba_l2
"""
from configs import _seg


def get_config(arg=None):
  return _seg.base("upernet_plainmamba_l2", arg)
