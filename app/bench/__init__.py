"""The caching-strategy benchmark: scripted chat, strategies, report, CLI; plot is the only Qt."""
