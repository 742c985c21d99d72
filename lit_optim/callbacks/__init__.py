"""Lightning callbacks that make optimizer memory and speed visible (see issue: callbacks)."""
