"""Context parallelism (docs/spec.md §14): a sequence split over the ranks of a process group, each
rank holding its share of the positions, and ops that exchange only what their shape needs."""

from .exchange import Split, gather_sequence, gather_summaries, halo

__all__ = ["Split", "gather_sequence", "gather_summaries", "halo"]
