"""Chat sessions: the turn pipeline and the saved-state policy (core + storage, no Qt)."""
