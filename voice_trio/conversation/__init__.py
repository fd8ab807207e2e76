"""The conversation both call modes hold: history, persona, phrases, thinking with Claude,
sentences, key presses and turn records. Knows nothing of sockets or webhooks."""
