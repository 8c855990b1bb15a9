"""ToP token pruning: importance scores, static top-k selection, schedules, alignment gaps."""
from toppax.pruning.config import IMPORTANCE, PruneConfig, kept_count
from toppax.pruning.ops import alignment_gaps, importance

__all__ = ["PruneConfig", "kept_count", "importance", "alignment_gaps", "IMPORTANCE"]
