"""Redis: the key layout, the envelope each queued item is, the Lua scripts of reliable delivery, counters."""
