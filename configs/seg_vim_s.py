"""UperNet on ViM-S for ADE20K, the official recipe (schedule and arguments: configs/_seg.py).

  python -m toppax.main --config=configs/seg_vim_s.py:folder=/data/ADEChallengeData2016 \\
    --config.init_from=/path/to/official_vim_s.pth --workdir=/tmp/seg_vim_s
"""
from configs import _seg


def get_config(arg=None):
  return _seg.base("upernet_vim_s", arg)
