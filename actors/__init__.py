"""The actor layer below the roles: the fault-tolerant actor group, placement, weight transport."""
