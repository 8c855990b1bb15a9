"""UperNet on plainmamba-l1 for ADE20K semantic segmentation, the official recipe (configs/_seg.py).

Train from the official ImageNet checkpoint (classifier and cls token dropped, position embedding
resampled), evaluate every few thousand iterations, then compare dense / ToP / removal / EViT:
  python -m toppax.main --config=configs/seg_plainmamba_l1.py:folder=/data/ADEChallengeData2016 \
    --config.init_from=/path/to/official_classification.pth --workdir=/tmp/seg_plainmamba_l1
Evaluate an official mmseg checkpoint (or a workdir): --mode=eval --config.init_from=...
Arguments: `top`, `removal`, `evit` (train with the backbone pruned: the paper's schedule with
alignment, plain removal, or EViT's fused token), `folder=DIR` (ADEChallengeData2016 as a folder
or a .zip), `data_dir=DIR` (the TFDS copy, scene_parse150), `steps=N` (iterations),
`runlocal` (a seconds-long CPU smoke run on generated scenes).
"""
from configs import _seg


def get_config(arg=None):
  return _seg.base("upernet_plainmamba_l1", arg)
