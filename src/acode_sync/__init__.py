"""acode-sync: the persistence layer and sync daemon for a coding agent's run state."""

__version__ = "0.1.0"
