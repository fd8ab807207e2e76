"""The instance: what one server process shares between its calls, how webhooks reach
them, and the live-call orders that may come from another process."""
