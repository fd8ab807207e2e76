"""The domain: one call's life — session, turn-taking, conversation, registry."""
