"""ToP token pruning: importance scores, static top-k selection, schedules, alignment gaps,
and the pruning step the models share (``prune``, ``Tokens``, ``TokenRestorer``)."""
from toppax.pruning.config import IMPORTANCE, PruneConfig, kept_count
from toppax.pruning.ops import alignment_gaps, importance
from toppax.pruning.step import Pruned, TokenRestorer, Tokens, full_positions, prune

__all__ = ["PruneConfig", "kept_count", "importance", "alignment_gaps", "IMPORTANCE", "prune",
           "Pruned", "Tokens", "TokenRestorer", "full_positions"]
